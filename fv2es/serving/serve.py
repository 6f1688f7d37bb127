"""Run tritonserver in the foreground on a model repository (what `make serve` calls).

    python -m fv2es.serving.serve --model-repository model_repository

The server logs to this terminal; Ctrl-C or SIGTERM stops it cleanly. It listens on
loopback only; `--address 0.0.0.0` exposes it to the network (see the README, Security).
"""
from __future__ import annotations

import argparse
import signal
import sys

from fv2es.serving.tritonserver import (ADMIN_APIS, ADMIN_KEY_GRPC_HEADER, ADMIN_KEY_HEADER, MODEL_CONTROL_MODES,
                                        GrpcTls, TritonServer)


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", required=True)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--address", default="127.0.0.1",
                        help="interface HTTP, gRPC and metrics listen on (0.0.0.0: every interface)")
    parser.add_argument("--grpc-tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate")
    parser.add_argument("--grpc-tls-key", metavar="PEM", help="the certificate's private key")
    parser.add_argument("--grpc-tls-client-ca", metavar="PEM",
                        help="mutual TLS: admit only gRPC clients with a certificate this CA signed")
    parser.add_argument("--admin-key", metavar="KEY",
                        help=f"answer {', '.join(ADMIN_APIS)} requests only with KEY in header "
                             f"{ADMIN_KEY_HEADER} (HTTP) or {ADMIN_KEY_GRPC_HEADER} (gRPC)")
    parser.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default="none")
    parser.add_argument("--load-model", action="append", default=[], metavar="NAME",
                        help="with --model-control-mode explicit: load this model at start ('*' for all)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--auto-complete-config", action="store_true",
                        help="let backends complete partial configs (slower start-up)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    args, extra = parser.parse_known_args(argv)  # anything else goes to tritonserver as is
    tls_files = (args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca)
    if any(tls_files) and not (args.grpc_tls_cert and args.grpc_tls_key):
        parser.error("gRPC TLS needs both --grpc-tls-cert and --grpc-tls-key")
    grpc_tls = GrpcTls(*tls_files) if args.grpc_tls_cert else None

    try:
        server = TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, address=args.address, grpc_tls=grpc_tls,
                              admin_key=args.admin_key, model_control_mode=args.model_control_mode,
                              load_models=args.load_model, log_verbose=args.log_verbose,
                              auto_complete_config=args.auto_complete_config, extra_args=extra)
    except ValueError as error:
        parser.error(str(error))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        server.start(timeout=args.startup_timeout)
        print(f"\nFV2ES is being served. gRPC: {server.grpc_url}{' (TLS)' if grpc_tls else ''}  "
              f"HTTP: {server.http_url}  metrics: {server.metrics_url}  listening on {args.address}  "
              "(Ctrl-C stops)\n", flush=True)
        return server.process.wait()
    except KeyboardInterrupt:
        print("\nstopping tritonserver ...", file=sys.stderr, flush=True)
        server.stop()
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
