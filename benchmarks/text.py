"""Prompt faithfulness and FID of a text run on its benchmark scenes, against the guidance scale.

    python benchmarks/text.py runs/fashion-pairs-30min --set fashion-pairs --num 1000 \
        --scales 3 1 1.5 2 5 --out benchmarks/results/text/fashion-pairs-30min

For each guidance scale: `lddpm.evaluate.evaluate_checkpoint` samples one image per prompt of a
balanced prompt set (`lddpm.data.scenes.write_prompt_set`: half held-out pairs or phrasings), scores
prompt faithfulness with the GenEval-style checker (and its ceiling: the same checker on real
rendered test scenes for the same prompts), and FID/KID against N rendered test scenes. Writes one
`lddpm eval` JSON per scale (`s<scale>.json`), the real-data floor (`floor.json`: N train scenes
against the same test reference), the prompt set, and `table.md` rendered from those files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lddpm.data.scenes import write_prompt_set
from lddpm.evaluate import evaluate_checkpoint, load_extractor, real_data_floor, reference_stats
from lddpm.evaluate.score import summary_line, write_result
from lddpm.pipeline import load_pipeline

HEADLINE = {
    "fashion-pairs": ("slot_accuracy", "pair_accuracy", "swap_rate", "presence"),
    "fashion-text": ("class_accuracy", "size_accuracy", "brightness_accuracy", "all_accuracy"),
}


def _ratio(value, ceiling) -> str:
    return f" ({value / ceiling:.2f})" if value is not None and ceiling else ""


def render_table(out: Path) -> str:
    """The Markdown table of every s<scale>.json in `out` (sorted by scale), with the floor and the ceiling.

    The headline metric (pair accuracy, or all-clauses accuracy for fashion-text) is also split into seen and
    held-out prompts, each with its fraction of the ceiling's value on the same prompts in brackets."""
    results = sorted((json.loads(p.read_text()) for p in out.glob("s*.json")),
                     key=lambda r: r["settings"]["guidance_scale"])
    if not results:
        return ""
    task = results[0]["faithfulness"]["scores"]["task"]
    keys = HEADLINE[task]
    head_key = "pair_accuracy" if task == "fashion-pairs" else "all_accuracy"
    name = head_key.replace("_", " ")
    head = ["guidance s", *[k.replace("_", " ") for k in keys], f"{name}, seen (of ceiling)",
            f"{name}, held-out (of ceiling)", f"FID (N={results[0]['num_images']})", "KID x10^3", "s / image"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ceiling = results[0]["faithfulness"]["ceiling"]
    c_seen, c_held = (ceiling.get("seen") or {}).get(head_key), (ceiling.get("heldout") or {}).get(head_key)
    for r in results:
        f = r["faithfulness"]["scores"]
        seen, held = (f.get("seen") or {}).get(head_key), (f.get("heldout") or {}).get(head_key)
        cells = [f"{r['settings']['guidance_scale']:g}", *[f"{f[k]:.3f}" if f.get(k) is not None else "" for k in keys],
                 f"{seen:.3f}{_ratio(seen, c_seen)}" if seen is not None else "",
                 f"{held:.3f}{_ratio(held, c_held)}" if held is not None else "", f"{r['fid']:.2f}",
                 f"{r['kid'] * 1e3:.2f}" if r.get("kid") is not None else "",
                 f"{r['cost']['seconds_per_image']:.3f}" if r["cost"].get("seconds_per_image") else ""]
        rows.append("| " + " | ".join(cells) + " |")
    floor_path = out / "floor.json"
    floor = json.loads(floor_path.read_text()) if floor_path.is_file() else {}
    cells = ["real test scenes: checker ceiling / real train scenes: FID floor",
             *[f"{ceiling[k]:.3f}" if ceiling.get(k) is not None else "" for k in keys],
             f"{c_seen:.3f}" if c_seen is not None else "", f"{c_held:.3f}" if c_held is not None else "",
             f"{floor['fid']:.2f}" if floor else "", f"{floor['kid'] * 1e3:.2f}" if floor.get("kid") is not None else "", ""]
    rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--set", dest="scene_set", choices=tuple(HEADLINE), default="fashion-pairs")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 1.0, 1.5, 2.0, 5.0])
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--bf16", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = write_prompt_set(args.scene_set, out / "prompts.jsonl", num=args.num, heldout="both", seed=0)
    extractor = load_extractor(None, None, batch_size=args.batch_size, device="cpu")
    reference = reference_stats(args.scene_set, split="test", num=args.num, resolution=32, extractor=extractor,
                                progress=False)
    if not (out / "floor.json").is_file():
        floor = real_data_floor(args.scene_set, reference=reference, split="train", num=args.num, resolution=32,
                                extractor=extractor, progress=False)
        write_result(floor, out / "floor.json")
    bf16 = {"true": True, "false": False}.get(args.bf16, args.bf16)
    pipeline = load_pipeline(args.run, bf16=bf16)
    for scale in args.scales:
        path = out / f"s{scale:g}.json"
        if path.is_file():
            continue
        result = evaluate_checkpoint(
            args.run, num=args.num, sampler=args.sampler, num_steps=args.steps, guidance_scale=scale,
            reference=reference, extractor=extractor, batch_size=args.batch_size, device="cpu", pipeline=pipeline,
            prompts=prompts, progress=False)
        write_result(result, path)
        print(f"s = {scale:g}: {summary_line(result)}", flush=True)
    table = render_table(out)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
