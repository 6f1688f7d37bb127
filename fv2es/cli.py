"""`fv2es predict VIDEO`: the whole model in this process, on the CPU."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fail(message: str) -> int:
    print(f"fv2es: error: {message}", file=sys.stderr)
    return 2


def predict(args) -> int:
    from fv2es_client.cli import format_prediction
    from fv2es_client.client import InvalidInput, Prediction, read_media

    from fv2es.media import MediaError

    try:
        media, _ = read_media(args.video)
    except InvalidInput as exc:
        return _fail(str(exc))
    transcriber = None
    if not args.transcript and args.asr != "none":
        from fv2es.asr import Transcriber

        transcriber = Transcriber(args.asr)
    from fv2es.checkpoint import ModelSource
    from fv2es.predictor import Predictor

    try:
        model = ModelSource.from_args(args).load()
    except (OSError, ValueError) as exc:     # CheckpointError is a ValueError
        return _fail(f"cannot load the model ({args.checkpoint or 'untrained'}): {exc}")
    predictor = Predictor(model=model, transcriber=transcriber)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(predictor.steps), desc=Path(args.video).name, unit="step", file=sys.stderr, leave=False)
    try:
        result = predictor.predict(media, args.transcript or "", progress=(lambda name: (
            bar.set_postfix_str(name), bar.update(1))) if bar else None)
    except MediaError as exc:
        return _fail(f"{args.video}: {exc}")
    finally:
        if bar:
            bar.close()
    prediction = Prediction.from_outputs(result.tensors, source=args.video)
    timings = {name: round(seconds, 4) for name, seconds in result.timings.items()}
    if args.json:
        print(json.dumps({**prediction.to_dict(), "timings_s": timings}, indent=2))
    else:
        print(format_prediction(prediction))
        print("timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fv2es", description="FV2ES video emotion recognition")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict emotions for one video, in this process")
    p.add_argument("video")
    p.add_argument("--transcript", help="the words spoken; skips speech recognition")
    from fv2es.checkpoint import ModelSource

    ModelSource.add_arguments(p)
    p.add_argument("--asr", default="whisper-tiny.en", help="speech recognition model, or 'none'")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return predict(args)


if __name__ == "__main__":
    sys.exit(main())
