"""``python -m training.benchmarks``: build a paper's evaluation benchmark from your own pictures.

    python -m training.benchmarks --protocol emojidiff --identities faces/ --expressions expressions/ --out bench/ \\
        [--num-identities 50] [--num-expressions 30] [--per-identity 30] [--seed 0]

Protocols (``training.paper_tables.PROTOCOLS``; ``--paper-table`` prints them beside your run):

- ``arc2face``: N identities (paper: 1,000), each with 5 expression pictures drawn at random from an AffectNet-style
  pool (the paper's: AffectNet's validation set).
- ``emojidiff``: identities x expressions (paper: 50 x 30), every identity with every expression (our reading).
- ``facecrafter``: 100 identities and 100 targets, 2,000 pairs: each identity gets 20 targets and each target serves
  20 identities (the paper does not say how its 2,000 pairs were drawn).
- ``facecrafter-diversity``: ID-only samples (paper: Synth-500 / AgeDB-500, 500 identities); samples per identity
  are not stated, so ``--per-identity`` must be given.

Pictures are found recursively in the folders; a random subset (``--seed``) is taken where there are more than the
protocol asks for, and all of them, with a note, where there are fewer. The benchmark folder gets
``identities/id0000.jpg ...`` and ``expressions/exp0000.jpg ...`` (copies), ``targets.json`` for
``training.evaluate --targets`` (each entry names the picture to generate, ``id0003-exp0012``, with its
identity and expression images) and ``protocol.json`` (the paper's counts, this benchmark's, and the sources).
Generate one picture per entry under its ``generated`` name (ComfyUI's counter suffix is fine), with the paper's
sampler, steps and guidance, then evaluate with ``--paper-table``; for FID, ``--real`` the ``identities/`` folder
(Arc2Face-Exp's FID is against the identity images) or the paper's own reference set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from .paper_tables import PROTOCOLS
from .prepare import IMAGE_SUFFIXES


def list_pictures(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def take(pictures: list[Path], count: int | None, rng, what: str, notes: list[str]) -> list[Path]:
    """``count`` of them at random, in sorted order (all when count is None or there are fewer, with a note)."""
    if count is None or count >= len(pictures):
        if count is not None and count > len(pictures):
            notes.append(f"{len(pictures)} {what}, fewer than the protocol's {count}: all are used")
        return pictures
    chosen = rng.choice(len(pictures), count, replace=False)
    return [pictures[i] for i in sorted(chosen)]


def assignments(protocol: str, identities: int, expressions: int, per_identity: int | None, rng) -> list[list[int]]:
    """For each identity, the indices of its expression pictures (empty lists: ID-only samples, counted apart)."""
    if protocol == "facecrafter-diversity":
        return [[] for _ in range(identities)]
    if protocol == "emojidiff":
        return [list(range(expressions)) for _ in range(identities)]
    if per_identity > expressions:
        raise SystemExit(f"{per_identity} expressions per identity, but only {expressions} expression pictures: "
                         "give more, or a smaller --per-identity")
    if protocol == "arc2face":  # "for each subject, we randomly sample 5 target expression images"
        return [sorted(rng.choice(expressions, per_identity, replace=False).tolist()) for _ in range(identities)]
    # facecrafter: identity i takes the next per_identity targets of a shuffled ring, so the targets are spread evenly
    order = rng.permutation(expressions)
    return [sorted(int(order[(i * per_identity + j) % expressions]) for j in range(per_identity)) for i in range(identities)]


def copy_pictures(pictures: list[Path], folder: Path, prefix: str) -> list[str]:
    """Copies named ``<prefix><index>`` (the sources' names may clash or hold characters ComfyUI rewrites)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, source in enumerate(pictures):
        target = folder / f"{prefix}{index:04d}{source.suffix.lower()}"
        shutil.copyfile(source, target)
        names.append(f"{folder.name}/{target.name}")
    return names


def build(protocol: str, identities_folder, out, expressions_folder=None, num_identities: int | None = None,
          num_expressions: int | None = None, per_identity: int | None = None, seed: int = 0) -> dict:
    """Write the benchmark; returns protocol.json's content."""
    if protocol not in PROTOCOLS:
        raise SystemExit(f"--protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    paper = PROTOCOLS[protocol]
    id_only = paper.expressions == 0
    per_identity = per_identity if per_identity is not None else paper.per_identity
    if protocol == "emojidiff":
        per_identity = None  # every identity meets every expression picture
    if id_only and per_identity is None:
        raise SystemExit(f"{protocol}: the paper does not state how many samples per identity; give --per-identity")
    if not id_only and expressions_folder is None:
        raise SystemExit(f"{protocol} pairs identities with expression pictures: give --expressions")
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    identity_pictures = take(list_pictures(identities_folder), num_identities or paper.identities, rng, "identities", notes)
    expression_pictures = [] if id_only else take(list_pictures(expressions_folder), num_expressions or paper.expressions,
                                                  rng, "expression pictures", notes)
    if not identity_pictures or (not id_only and not expression_pictures):
        raise SystemExit("no pictures found (" + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    out = Path(out)
    identity_names = copy_pictures(identity_pictures, out / "identities", "id")
    expression_names = copy_pictures(expression_pictures, out / "expressions", "exp")
    entries = []
    for i, chosen in enumerate(assignments(protocol, len(identity_names), len(expression_names), per_identity, rng)):
        identity = f"id{i:04d}"
        if id_only:
            entries += [{"generated": f"{identity}-s{k:02d}", "identity": identity, "identity_image": identity_names[i]}
                        for k in range(per_identity)]
        for j in chosen:
            entries.append({"generated": f"{identity}-exp{j:04d}", "identity": identity,
                            "identity_image": identity_names[i], "expression_image": expression_names[j]})
    (out / "targets.json").write_text(json.dumps(entries, indent=1), encoding="utf-8")
    record = {"protocol": protocol, "seed": seed, "notes": notes,
              "paper": {"identities": paper.identities, "expressions": paper.expressions,
                        "per_identity": paper.per_identity, "pairs": paper.pairs, "text": paper.text},
              "benchmark": {"identities": len(identity_names), "expressions": len(expression_names),
                            "per_identity": len(entries) // len(identity_names), "pairs": len(entries)},
              "sources": {name: str(path) for name, path in zip(identity_names + expression_names,
                                                                 identity_pictures + expression_pictures, strict=True)}}
    (out / "protocol.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.benchmarks", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", required=True, choices=tuple(PROTOCOLS))
    parser.add_argument("--identities", required=True, help="folder of identity pictures, one person each")
    parser.add_argument("--expressions", help="folder of expression (target) pictures")
    parser.add_argument("--out", required=True, help="benchmark folder to write")
    parser.add_argument("--num-identities", type=int, help="default: the paper's")
    parser.add_argument("--num-expressions", type=int, help="distinct expression pictures (default: the paper's)")
    parser.add_argument("--per-identity", type=int, help="pictures to generate per identity (default: the paper's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    record = build(args.protocol, args.identities, args.out, args.expressions, args.num_identities,
                   args.num_expressions, args.per_identity, args.seed)
    counts = record["benchmark"]
    print(f"{args.protocol}: {counts['identities']} identities, {counts['expressions']} expression pictures, "
          f"{counts['pairs']} pictures to generate -> {Path(args.out) / 'targets.json'}")
    for note in record["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
