"""Run tritonserver in the foreground on a model repository (what `make serve` calls).

    python -m fv2es.serving.serve --model-repository model_repository

The server logs to this terminal; Ctrl-C or SIGTERM stops it cleanly.
"""
from __future__ import annotations

import argparse
import signal
import sys

from fv2es.serving.tritonserver import MODEL_CONTROL_MODES, TritonServer


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", required=True)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default="none")
    parser.add_argument("--load-model", action="append", default=[], metavar="NAME",
                        help="with --model-control-mode explicit: load this model at start ('*' for all)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--auto-complete-config", action="store_true",
                        help="let backends complete partial configs (slower start-up)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    args, extra = parser.parse_known_args(argv)  # anything else goes to tritonserver as is

    server = TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, model_control_mode=args.model_control_mode,
                          load_models=args.load_model, log_verbose=args.log_verbose,
                          auto_complete_config=args.auto_complete_config, extra_args=extra)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        server.start(timeout=args.startup_timeout)
        print(f"\nFV2ES is being served. gRPC: {server.grpc_url}  HTTP: {server.http_url}  "
              f"metrics: localhost:{server.metrics_port}/metrics  (Ctrl-C stops)\n", flush=True)
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
