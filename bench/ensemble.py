"""Validation Dice of an ensemble of hippocampus FCNs against each member alone, on one fold.

Each member is a weights file of the bundle's network: a ``model.pt`` / ``best_model.pt`` state
dict, or a run's ``last.pt`` (its moving average when it has one, else its network). The
ensemble averages the members' softmax probabilities voxel by voxel (as nnU-Net does); it is
validated exactly as the bundle validates in training (train.json's ``validate`` section:
sliding window, bf16 on CPU, per-class Dice on the fold at 1 mm). Members must not have
trained on the fold's cases.

Prints a markdown table and writes bench/results/ensemble<tag>.json.

    python bench/ensemble.py bundles/hippocampus_fcn/models/model.pt runs/a/last.pt [--fold 0] [--tta]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hippocampus_fcn"


class MeanProbability(nn.Module):
    """Log of the members' mean softmax: ``(B, C, *S)`` logits in, ``(B, K, *S)`` out, so that
    the bundle's softmax postprocessing yields exactly the mean probability."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return mean.clamp_min(1e-8).log()


def member_weights(path: Path) -> dict:
    """The network state dict held by ``path`` (see the module docstring)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "network" in state and isinstance(state["network"], dict):  # a run's last.pt
        return state.get("weight_average", {}).get("network") or state["network"]
    return state


def trained_flip_axes() -> list[int]:
    """The axes the bundle's model trained flipped along, which ``medfcn infer --tta`` flips:
    ``trained_flip_axes`` of its common.json."""
    return list(ConfigParser.load_config_file(str(BUNDLE / "configs" / "common.json"))["trained_flip_axes"])


def validation_parser(fold: int, output_dir: str, tta_axes: list[int] | None = None) -> ConfigParser:
    """The bundle's train.json set to validate on ``fold``, writing only to ``output_dir``: its
    ``validate`` section keeps the metric handlers alone (no TensorBoard writer, no overlays).
    With ``tta_axes`` its sliding window also runs on the volume flipped along each of them
    (``medfcn.inferers.FlipTTA``)."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in ("common.json", "train.json")])
    parser.read_meta(str(BUNDLE / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(BUNDLE), "fold": fold, "output_dir": output_dir})
    parser["validate#handlers"] = [parser["validate#handlers"][0]]
    if tta_axes:
        window = parser["validate#inferer#inferer"]
        flips = {"_target_": "medfcn.inferers.FlipTTA", "inferer": window, "spatial_axes": tta_axes}
        parser["validate#inferer#inferer"] = flips
    return parser


def load_member(parser: ConfigParser, path: Path) -> nn.Module:
    """The bundle's network (``network_def``) on the bundle's device, holding ``path``'s weights,
    in eval mode."""
    net = parser.get_parsed_content("network_def", lazy=False).to(parser.get_parsed_content("device"))
    net.load_state_dict(member_weights(path))
    return net.eval()


def validate(evaluator, network: nn.Module) -> tuple[dict, float]:
    """Per-class Dice of ``network`` on the fold by the bundle's ``evaluator`` (built once, so
    the fold is loaded once), and the median model seconds per volume."""
    seconds: list[float] = []
    start = network.register_forward_pre_hook(lambda *_: seconds.append(-time.perf_counter()))
    end = network.register_forward_hook(lambda *_: seconds.append(seconds.pop() + time.perf_counter()))
    evaluator.network = network
    evaluator.run()
    start.remove()
    end.remove()
    m = evaluator.state.metrics
    dice = {k.removeprefix("val_dice_"): v for k, v in m.items() if k.startswith("val_dice_")}
    dice["mean"] = m["val_mean_dice"]
    return dice, statistics.median(seconds)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("members", nargs="+", type=Path, help="weights files (model.pt, best_model.pt, last.pt)")
    cli.add_argument("--fold", type=int, default=0)
    cli.add_argument("--tag", default="", help="suffix of the result file")
    cli.add_argument("--tta", action="store_true", help="validate with left-right flip test-time augmentation")
    args = cli.parse_args()
    torch.set_grad_enabled(False)
    tta_axes = trained_flip_axes() if args.tta else []

    with tempfile.TemporaryDirectory() as tmp:
        parser = validation_parser(args.fold, tmp, tta_axes)
        members = [load_member(parser, path) for path in args.members]
        evaluator = parser.get_parsed_content("validate#evaluator")
        rows = []
        passes = 1 + len(tta_axes)  # the volume, then each flip
        for path, net in zip(args.members, members, strict=True):
            dice, secs = validate(evaluator, net)
            rows.append({"model": str(path), **dice, "seconds_per_volume": passes * secs})
        dice, secs = validate(evaluator, MeanProbability(members).eval())
        rows.append({"model": f"ensemble of {len(members)}", **dice, "seconds_per_volume": passes * secs})

    print("| model | anterior | posterior | mean | model s / volume |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        dice = " | ".join(f"{r[k]:.4f}" for k in ("anterior", "posterior", "mean"))
        print(f"| {r['model']} | {dice} | {r['seconds_per_volume']:.3f} |")
    out = REPO / "bench" / "results" / f"ensemble{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"date": time.strftime("%Y-%m-%d"), "fold": args.fold, "tta": args.tta, "rows": rows}
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
