"""DET presence annotation: human questions and seconds per image, the question tree against asking every class.

    .venv/bin/python benchmarks/presence_sim.py                          # 1,000 images, 200 classes, 3 seeds
    .venv/bin/python benchmarks/presence_sim.py --images 300 --seeds 1   # quicker

Every scheme runs `pipeline.presence.plan_presence`, the replay the real loop runs (crowd/simulate_presence.py:
plan -> simulated answers -> plan ... until nothing is left to ask), with the same QC (the presence worker model,
decisions on the Bayes factor with the co-occurrence prior) and the same workers.

The world (crowd/simulate_presence.make_world): 200 classes under a three-level hierarchy (10 top-level groups of
2-3 sub-groups of 6-10 classes), the question tree built from it by `build_question_tree` as for a WordNet
vocabulary. Images are sparse and correlated: each shows one of 16 scenes; the number of objects is
1 + Poisson(1.8) (about 2.8, ILSVRC-2014 DET val's figure), each drawn from its scene's ~12 typical classes (in two
or three groups) with probability 0.85, else from all classes. Workers: the crowd of the QC benchmarks (accuracy
Beta(8, 2), the same on present and absent objects; 10 % spammers answering at random), 500 of them.

Schemes: "flat" asks every class of every image (the same classes with no question nodes, all at once); "tree"
asks one yes/no question per task from the question tree (two per image at a time, the next by expected labels
settled per second given co-occurrence); "checklist" asks a node's open children (or the top-level questions) as
one task. "+ controls" mixes in ImageNetV2-style controls: 3 known positives and 3 known negatives per 48 tasks,
from 30 expert-annotated control images (their answers are counted in the cost).

Assumed human times (not measurements; --t-question / --t-group-base / --t-group-item): 2.0 s per yes/no
question about a whole image at any level of the tree, a checklist of k related classes 2.0 s + 0.8 s x k (one
look at the image, then a glance per item).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crowd.simulate_presence import make_world, run_inprocess, score  # noqa: E402
from pipeline.config import DetSettings  # noqa: E402
from pipeline.presence import QuestionTimes  # noqa: E402

SCHEMES = {
    "flat": dict(scheme="question", questions_per_round=1000),
    "tree": dict(scheme="question", questions_per_round=2),
    "checklist": dict(scheme="checklist"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--gold-images", type=int, default=30, help="expert-annotated control images (+ controls rows)")
    ap.add_argument("--schemes", default="flat,tree,checklist")
    ap.add_argument("--no-controls", action="store_true", help="only the rows without controls")
    ap.add_argument("--controls-only", action="store_true", help="only the rows with controls")
    ap.add_argument("--accept-at", type=float, default=None)
    ap.add_argument("--miss-factor", type=float, default=None)
    ap.add_argument("--max-votes", type=int, default=None)
    ap.add_argument("--t-question", type=float, default=2.0)
    ap.add_argument("--t-group-base", type=float, default=2.0)
    ap.add_argument("--t-group-item", type=float, default=0.8)
    args = ap.parse_args()
    times = QuestionTimes(args.t_question, args.t_group_base, args.t_group_item)
    override = {k: v for k, v in (("accept_at", args.accept_at), ("miss_factor", args.miss_factor),
                                  ("max_votes", args.max_votes)) if v is not None}
    controls = [False, True]
    if args.no_controls:
        controls = [False]
    if args.controls_only:
        controls = [True]
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for scheme in args.schemes.split(","):
            for gold in controls:
                world = make_world(args.images, seed, n_gold=args.gold_images if gold else 0, flat=scheme == "flat")
                policy = DetSettings(**SCHEMES[scheme], **override)
                t0 = time.perf_counter()
                res = run_inprocess(world, policy, seed=seed, times=times)
                r = score(world, res)
                r.update(scheme=scheme + (" + controls" if gold else ""), seed=seed,
                         wall_s=round(time.perf_counter() - t0, 1))
                rows.append(r)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    df = pd.DataFrame(rows)
    cols = ["questions_per_image", "tasks_per_image", "answers_per_image", "seconds_per_image", "recall",
            "precision", "gold_answer_share", "objects_per_image", "rounds"]
    mean = df.groupby("scheme", sort=False)[cols].mean()
    if "flat" in mean.index:
        mean["seconds_vs_flat"] = mean.loc["flat", "seconds_per_image"] / mean["seconds_per_image"]
    print()
    print(f"mean over {args.seeds} seed(s), {args.images} images x 200 classes; assumed times: question "
          f"{times.question} s, checklist {times.group_base} s + {times.group_item} s per item; settings "
          f"{ {**DetSettings().model_dump(include={'accept_at', 'miss_factor', 'max_votes'}), **override} }")
    print(mean.round(4).to_string())


if __name__ == "__main__":
    main()
