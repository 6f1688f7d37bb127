"""`fv2es-client`: emotions of video files from a running fv2es Triton server.

Exit codes: 0 all files answered; 1 at least one file failed; 2 bad arguments;
3 the server is not reachable or the model not ready.
"""
from __future__ import annotations

import argparse
import json
import sys

from .client import Fv2esClient, Fv2esError, ModelNotReady, Prediction, ServerUnreachable

EXIT_FILE_FAILED = 1
EXIT_SERVER = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fv2es-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default="localhost:8001", help="Triton gRPC address (default: %(default)s)")
    server.add_argument("--model", default="fv2es", help="ensemble name (default: %(default)s)")
    server.add_argument("--json", action="store_true", help="print JSON instead of text")
    tls = server.add_argument_group("TLS")
    tls.add_argument("--ssl", action="store_true", help="use a TLS channel")
    tls.add_argument("--root-certificates", metavar="PEM", help="CA certificates (default: gRPC's)")
    tls.add_argument("--private-key", metavar="PEM", help="client key, for mutual TLS")
    tls.add_argument("--certificate-chain", metavar="PEM", help="client certificate chain, for mutual TLS")

    predict = commands.add_parser("predict", parents=[server], help="recognise emotions in video files",
                                  description="Recognise emotions in video files. With --json, prints one "
                                              "JSON list with one entry per file, in argument order.")
    predict.add_argument("files", nargs="+", metavar="VIDEO")
    predict.add_argument("--transcript", metavar="TEXT",
                         help="what is said, for every file (default: the server recognises speech)")
    predict.add_argument("--concurrency", type=int, default=4, metavar="N",
                         help="requests in flight (default: %(default)s)")
    predict.add_argument("--timeout", type=float, default=300.0, metavar="S",
                         help="per-request limit in seconds (default: %(default)s)")
    predict.add_argument("--retries", type=int, default=3, metavar="N",
                         help="retries when the server cannot be reached (default: %(default)s)")
    predict.add_argument("--wait", type=float, default=0.0, metavar="S",
                         help="wait up to S seconds for the server and model to be ready (default: check once)")

    commands.add_parser("health", parents=[server], help="show the server's and the model's state")
    return parser


def format_prediction(p: Prediction) -> str:
    lines = [f"{p.source}  ({p.duration:.1f} s)"]
    lines += [f"  ! {warning}" for warning in p.warnings]
    lines.append("  emotions:   " + "  ".join(f"{label} {prob:.3f}" for label, prob in p.ranked()))
    lines.append(f"  top:        {p.top_label} ({p.top_probability:.3f})")
    lines.append("  logits:     " + " " * 8 + " ".join(f"{label:>7}" for label in p.labels))
    lines.append("              " + "fused   " + " ".join(f"{v:7.3f}" for v in p.fused_logits))
    for modality, logits in p.modality_logits.items():
        if p.modality_present[modality]:
            values = " ".join(f"{v:7.3f}" for v in logits)
            lines.append(f"              {modality:<8}{values}   top {p.modality_top_labels[modality]}")
        else:
            lines.append(f"              {modality:<8}(left out)")
    found = p.faces_found
    lines.append(f"  faces:      {sum(found)} of {len(found)} sampled frames")
    transcript = p.transcript if p.transcript else "(empty)"
    asr = f", {p.asr_seconds:.2f} s" if p.transcript_source == "recognition" else ""
    lines.append(f"  transcript: {transcript}  [{p.transcript_source}{asr}]")
    lines.append(f"  weights:    {p.weights}")
    return "\n".join(lines)


def run_predict(client: Fv2esClient, args) -> int:
    results = client.predict_many(args.files, concurrency=args.concurrency,
                                  transcripts=[args.transcript] * len(args.files),
                                  progress=len(args.files) > 1)
    failed = [r for r in results if isinstance(r, Exception)]
    for error in failed:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        entries = [{"source": path, "ok": False, "error": type(r).__name__, "message": str(r)}
                   if isinstance(r, Exception) else {"ok": True, **r.to_dict()}
                   for path, r in zip(args.files, results)]
        print(json.dumps(entries))
    else:
        print("\n\n".join(format_prediction(r) for r in results if isinstance(r, Prediction)))
    return EXIT_FILE_FAILED if failed else 0


def run_health(client: Fv2esClient, args) -> int:
    health = client.server_health()
    if args.json:
        print(json.dumps(health, indent=2))
    else:
        print(f"server {health['url']}: {health['server']} {health['version']}, "
              f"live {health['live']}, ready {health['ready']}")
        print(f"model {health['model']}: ready {health['model_ready']}")
        for problem in health["contract_problems"]:
            print(f"  contract mismatch: {problem}")
    healthy = health["live"] and health["model_ready"] and not health["contract_problems"]
    return 0 if healthy else EXIT_FILE_FAILED


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = {}
    if args.command == "predict":
        if args.concurrency < 1:
            parser.error("--concurrency must be at least 1")
        options = {"timeout_s": args.timeout, "retries": args.retries}
    try:
        client = Fv2esClient(args.url, model=args.model, ssl=args.ssl,
                             root_certificates=args.root_certificates, private_key=args.private_key,
                             certificate_chain=args.certificate_chain, **options)
        with client:
            if args.command == "health":
                return run_health(client, args)
            # One readiness check first: an unreachable server is one error, not one per file.
            client.wait_ready(args.wait)
            return run_predict(client, args)
    except (ServerUnreachable, ModelNotReady) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_SERVER
    except Fv2esError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FILE_FAILED


if __name__ == "__main__":
    sys.exit(main())
