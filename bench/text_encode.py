"""Text-encoder throughput: texts/s of `text.encoders.encode_texts` (MiniLM by default).

    .venv/bin/python -m bench.text_encode                        # minilm, L = 32, batch 256
    .venv/bin/python -m bench.text_encode --length 77 --texts 2048 --out /tmp/minilm.json

Texts are synthetic captions of the demo's kind ("a thin seven leaning left", ...), tokenized
once outside the timing; the forward is compiled by a first untimed batch, then --reps passes
over --texts texts are timed (median reported), as the trainer would encode a dataset once.
"""

import argparse
import json
import os
import platform
import statistics
import time

import cpu_runtime


def captions(n: int) -> list[str]:
    digits = "zero one two three four five six seven eight nine".split()
    styles = ["a thin", "a thick", "a bold", "the digit", "a small handwritten", "a slanted"]
    lean = ["leaning left", "leaning right", "upright", "drawn with a thin pen", ""]
    return [f"{styles[i % 6]} {digits[i % 10]} {lean[i % 5]}".strip() for i in range(n)]


def main(argv=None) -> dict:
    cpu_runtime.restart_with_huge_page_malloc()  # CPU speed: cpu_runtime.py, section 3
    cpu_runtime.configure()  # before jax's first computation
    import jax

    from text import encoders

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--weights", default="")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    encoder = encoders.load_encoder(args.encoder, max_length=args.length, weights=args.weights)
    texts = captions(args.texts)
    begin = time.perf_counter()
    ids, mask = encoder.tokenize(texts)
    tokenize_s = time.perf_counter() - begin
    begin = time.perf_counter()
    encoder.encode_tokens(ids[:args.batch], mask[:args.batch])
    compile_s = time.perf_counter() - begin
    walls = []
    for _ in range(args.reps):
        begin = time.perf_counter()
        encoders.encode_texts(encoder, texts, batch_size=args.batch, log=lambda s: None)
        walls.append(time.perf_counter() - begin)
    wall = statistics.median(walls)
    result = {"encoder": args.encoder, "max_length": args.length, "batch": args.batch,
              "texts": args.texts, "tokenize_s": tokenize_s, "first_batch_s": compile_s,
              "wall_s": wall, "wall_s_all": walls, "texts_per_s": args.texts / wall,
              "devices": jax.device_count(), "jax": jax.__version__,
              "machine": platform.machine(), "cpus": os.cpu_count()}
    print(f"{args.encoder} L={args.length} batch {args.batch}: {args.texts / wall:.0f} texts/s "
          f"(median of {args.reps} x {args.texts} texts, {wall:.2f} s; tokenizing "
          f"{tokenize_s:.2f} s incl.; compile + first batch {compile_s:.2f} s; "
          f"{jax.device_count()} devices)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
