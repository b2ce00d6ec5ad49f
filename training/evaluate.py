"""``python -m training.evaluate``: score generated faces against their targets.

    python -m training.evaluate --generated ComfyUI/output/eval --targets targets.json --out results/ \\
        --insightface models/insightface/models/antelopev2 --smirk models/smirk/SMIRK_em1.pt \\
        [--landmarker models/mediapipe/face_landmarker.task] [--real data/real_faces --inception-weights inception.pth]

Targets: a JSON list (or a {name: entry} mapping) of entries. Each names its generated picture
(``"generated": "0001.png"``; ComfyUI's counter suffix such as ``0001_00001_.png`` matches too,
and ``--pair-by order`` pairs sorted files with entries in order instead) and gives the identity
as ``id_embedding`` (numbers) or ``identity_image`` (a path), and the expression as any of
``flame`` (55), ``blendshapes`` (52), ``landmarks`` (478 x 3, normalised, with optional
``landmarks_image_size`` [h, w]) or ``expression_image`` (a path, annotated here). A
``manifest.json`` from training.prepare also works: its samples are the entries, named by key.

Metrics (see :mod:`training.metrics`): ID similarity (needs --insightface), 3D Exp-MSE (needs
--smirk), Exp (sum and mean) and LMS (need --landmarker, MediaPipe), FID (needs --real and Inception
weights; computed by torchmetrics), LIQE (--liqe-weights with pyiqa). FaceCrafter's columns: Exp-RMSE
(SMIRK), Pose-RMSE (MediaPipe head pose), V/A/Dist-RMSE and Class-ACC (--emonet); ID-only diversity
(LPIPS with --lpips-backbone, std of expression and pose) over entries sharing an ``identity``. Arc2Face-Exp's
Em. Acc., AU-MSE and VA-MSE (--facetorch: facetorch's own FER, AU and VA predictors, files in --facetorch-models,
fetched by facetorch's downloader only with --facetorch-download; :mod:`training.facetorch_metrics`).
``--paper-table arc2face|emojidiff|facecrafter|...`` prints the paper's rows beside ours in the same columns, and the
paper's evaluation protocol (identities, expressions per identity, sampler, steps, guidance) beside this run's counts
(``python -m training.benchmarks`` builds each protocol's targets from your images); ID similarity then uses that
paper's recogniser (``training.paper_tables.PAPER_RECOGNIZERS``) unless --recognizer names another.
A metric whose model is not given is left out, with a note. Writes ``per_sample.csv``,
``summary.json`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import facetorch_metrics, metrics
from .prepare import IMAGE_SUFFIXES, read_image

METRIC_COLUMNS = ["id_similarity", "exp_mse", "exp", "exp_mean", "lms", "liqe"]
# Set-level columns (FaceCrafter Table 1), computed over all pairs that have both sides.
SET_METRICS = {"emotion": metrics.emotion_errors, "flame": lambda t, g: {"exp_rmse": metrics.exp_rmse(t, g)},
               "head_pose": lambda t, g: {"pose_rmse": metrics.pose_rmse(t, g)},
               **facetorch_metrics.SET_METRICS}  # Arc2Face-Exp's Em. Acc., AU-MSE, VA-MSE


class ImageAnnotator:
    """What the metrics need from one picture, each part only when its model is given."""

    def __init__(self, insightface=None, smirk=None, landmarker=None, provider="cpu", det_size=640,
                 smirk_channel_order="RGB", recognizer=None, emonet=None, facetorch=None):
        self.analyzer = self.smirk = self.landmarker = self.emonet = None
        self.facetorch = facetorch  # a facetorch_metrics.FacetorchAnnotator, or None
        if emonet:
            from encoders.emotion import load_emonet

            self.emonet = load_emonet(emonet)
        self.channel_order = smirk_channel_order
        if insightface:
            from encoders.identity import FaceAnalyzer

            self.analyzer = FaceAnalyzer.from_folder(insightface, recognizer=recognizer, det_size=det_size, provider=provider)
        if smirk:
            from encoders.smirk import load_smirk_encoder

            self.smirk = load_smirk_encoder(smirk)
        if landmarker:
            from encoders.face_landmarks import FaceLandmarker

            self.landmarker = FaceLandmarker(landmarker, max_faces=1)

    def __call__(self, rgb: np.ndarray) -> dict:
        import torch

        out: dict = {"image_size": rgb.shape[:2]}
        face = None
        if self.analyzer is not None:
            from encoders.identity import FaceNotFoundError

            try:
                face = self.analyzer.analyze(rgb)[0]
                out["id_embedding"] = face.embedding
            except FaceNotFoundError:
                out["error"] = "no face found"
        if self.landmarker is not None:
            try:
                result = self.landmarker.detect(rgb[None])
                out["landmarks"] = result.landmarks.values[0].numpy()
                out["blendshapes"] = result.blendshapes.values[0].numpy()
                from encoders.head_pose import head_pose_from_matrix

                out["head_pose"] = head_pose_from_matrix(result.matrices[0].numpy())
            except ValueError:
                out["error"] = "no MediaPipe face"
        if self.smirk is not None:
            from encoders.expressions import Landmarks
            from encoders.smirk import encode_expression

            from .annotate import box_landmarks

            if "landmarks" in out:
                landmarks = Landmarks(torch.from_numpy(out["landmarks"])[None])
            elif face is not None:
                landmarks = box_landmarks(face.box, rgb.shape[:2])
            else:
                landmarks = None
            if landmarks is not None:
                image = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]
                out["flame"] = encode_expression(self.smirk, image, landmarks, channel_order=self.channel_order)[0].values[0].numpy()
        if self.emonet is not None:
            from encoders.emotion import predict_emotion
            from encoders.expressions import Landmarks

            landmarks = Landmarks(torch.from_numpy(out["landmarks"])[None]) if "landmarks" in out else None
            out["emotion"] = predict_emotion(self.emonet, rgb[None], landmarks)[0].values[0].numpy()
        if self.facetorch is not None and (self.analyzer is None or face is not None):
            # facetorch's predictors read the detector's face box (the whole picture when no detector is given)
            out |= self.facetorch(rgb, None if face is None else face.box)
        return out


def load_targets(path) -> list[dict]:
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, Mapping) and "shards" in data:
        return targets_from_manifest(path)
    if isinstance(data, Mapping):
        data = [dict(entry, generated=entry.get("generated", name)) for name, entry in data.items()]
    entries = []
    for index, entry in enumerate(data):
        entry = dict(entry)
        for key in ("identity_image", "expression_image"):
            if key in entry and not Path(entry[key]).is_absolute():
                entry[key] = str(path.parent / entry[key])
        entry.setdefault("name", str(entry.get("generated", index)))
        entries.append(entry)
    return entries


def targets_from_manifest(path) -> list[dict]:
    from .shards import load_index, read_npy, read_sample

    entries = []
    for record in load_index(path):
        for position in range(record["num_samples"]):
            raw = read_sample(record, position)
            entry = {"name": raw["__key__"], "generated": raw["__key__"]}
            for field, key in (("id.npy", "id_embedding"), ("flame.npy", "flame"), ("blendshapes.npy", "blendshapes"),
                               ("landmarks.npy", "landmarks")):
                if field in raw:
                    entry[key] = read_npy(raw[field]).tolist()
            entries.append(entry)
    return entries


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"--generated {folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def pair(generated: list[Path], entries: list[dict], by: str) -> list[tuple[Path, dict]]:
    if by == "order":
        if len(generated) != len(entries):
            raise SystemExit(f"--pair-by order: {len(generated)} generated pictures but {len(entries)} targets")
        return list(zip(generated, entries))
    by_stem = {path.stem: path for path in generated}
    pairs, unmatched = [], []
    for entry in entries:
        stem = Path(str(entry["generated"])).stem
        match = by_stem.get(stem) or next((p for s, p in sorted(by_stem.items()) if s.startswith(stem + "_")), None)
        if match is None:
            unmatched.append(stem)
        else:
            pairs.append((match, entry))
    if unmatched:
        print(f"note: {len(unmatched)} targets have no generated picture (first: {unmatched[:3]})", file=sys.stderr)
    if not pairs:
        raise SystemExit("no generated picture matches a target by name; check the names or use --pair-by order")
    return pairs


def target_fields(entry: Mapping, annotator: ImageAnnotator, cache: dict) -> dict:
    """Target arrays: given numbers first, else annotations of the entry's images."""
    fields = {}
    if "id_embedding" in entry:
        fields["id_embedding"] = np.asarray(entry["id_embedding"], dtype=np.float64)
    elif "identity_image" in entry:
        fields["id_embedding"] = _annotated(entry["identity_image"], annotator, cache).get("id_embedding")
    expression = _annotated(entry["expression_image"], annotator, cache) if "expression_image" in entry else {}
    for key in ("flame", "blendshapes", "landmarks", "emotion", "head_pose", *facetorch_metrics.SET_METRICS):
        if key in entry:
            fields[key] = np.asarray(entry[key], dtype=np.float64)
        elif key in expression:
            fields[key] = expression[key]
    if "landmarks" in entry:
        fields["landmarks_image_size"] = entry.get("landmarks_image_size")
    elif "landmarks" in expression:
        fields["landmarks_image_size"] = expression["image_size"]
    return {k: v for k, v in fields.items() if v is not None}


def _annotated(path, annotator, cache) -> dict:
    if path not in cache:
        image = read_image(str(path))
        cache[path] = annotator(image) if image is not None else {}
    return cache[path]


def score_pair(generated: Mapping, target: Mapping) -> dict:
    row = {}
    if "id_embedding" in generated and "id_embedding" in target:
        row["id_similarity"] = float(metrics.id_similarity(target["id_embedding"], generated["id_embedding"])[0])
    if "flame" in generated and "flame" in target:
        row["exp_mse"] = float(metrics.exp_mse(target["flame"], generated["flame"])[0])
    if "blendshapes" in generated and "blendshapes" in target:
        row["exp"] = float(metrics.exp_score(target["blendshapes"], generated["blendshapes"])[0])
        row["exp_mean"] = float(metrics.exp_mean(target["blendshapes"], generated["blendshapes"])[0])
    if "landmarks" in generated and "landmarks" in target:
        row["lms"] = float(metrics.lms_score(target["landmarks"], generated["landmarks"],
                                             target.get("landmarks_image_size"), generated["image_size"])[0])
    return row


def set_metrics(pairs: list[tuple[Mapping, Mapping]]) -> dict[str, dict[str, float]]:
    """FaceCrafter's set-level columns over the pairs where both sides have the field."""
    out = {}
    for field, function in SET_METRICS.items():
        both = [(t[field], g[field]) for t, g in pairs if field in t and field in g]
        if both:
            values = function(np.stack([t for t, _ in both]), np.stack([g for _, g in both]))
            out |= {name: {"value": value, "count": len(both)} for name, value in values.items()}
    return out


def diversity(groups: Mapping[str, list[Mapping]], images: Mapping[str, list[np.ndarray]], lpips=None) -> dict:
    """ID-only diversity (FaceCrafter Table 2), averaged over identities with at least two samples:
    LPIPS between an identity's samples, and the std of their expression and pose parameters."""
    per_identity: dict[str, list[float]] = {"lpips": [], "exp_std": [], "pose_std": []}
    for name, annotated in groups.items():
        if len(annotated) < 2:
            continue
        if lpips is not None:
            per_identity["lpips"].append(metrics.mean_pairwise(images[name], lpips))
        for field, column in (("flame", "exp_std"), ("head_pose", "pose_std")):
            values = [a[field][metrics.FLAME_EXPRESSION] if field == "flame" else np.radians(a[field]) for a in annotated if field in a]
            if len(values) >= 2:
                per_identity[column].append(metrics.parameter_std(values))
    return {column: {"mean": float(np.mean(v)), "std": float(np.std(v)), "count": len(v)}
            for column, v in per_identity.items() if v}


def recognizer_for(insightface, recognizer, paper_table):
    """The recogniser to measure ID with: ``recognizer`` if given, else the paper's for ``paper_table`` (which must
    then be in the folder: another recogniser's numbers would not be comparable), else the folder's order."""
    from encoders.identity import find_model_files

    from .paper_tables import paper_recognizer

    if recognizer or not insightface:
        return recognizer
    chosen = paper_recognizer(paper_table)
    if chosen is not None:
        try:
            find_model_files(insightface, chosen)
        except FileNotFoundError as error:
            raise SystemExit(f"{error}\n--paper-table {paper_table} measures ID with the paper's recogniser {chosen}; "
                             "put it there, or give --recognizer to use another") from error
    return chosen


def compute_fid(real_folder, generated_paths, weights, backend, device) -> float:
    extractor = metrics.InceptionFeatures(weights, backend=backend, device=device)
    real = [read_image(str(p)) for p in list_images(real_folder)]
    fake = [read_image(str(p)) for p in generated_paths]

    def stack(images):
        images = [i for i in images if i is not None]
        import cv2

        return np.stack([cv2.resize(i, (299, 299), interpolation=cv2.INTER_AREA) for i in images])

    return metrics.fid_from_features(extractor(stack(real)), extractor(stack(fake)))


def evaluate(generated_folder, targets_path, out, insightface=None, smirk=None, landmarker=None, real=None,
             inception_weights=None, fid_backend="fid-inception", pair_by="name", provider="cpu", device="cpu",
             recognizer=None, det_size=640, emonet=None, liqe_weights=None, lpips_backbone=None,
             paper_table=None, facetorch=False, facetorch_models=facetorch_metrics.DEFAULT_MODELS,
             facetorch_download=False) -> dict:
    """``paper_table``: the table the numbers go beside; its paper's recogniser measures ID unless ``recognizer``
    names another. ``facetorch``: Arc2Face-Exp's Em. Acc., AU-MSE and VA-MSE with facetorch's predictors, their
    files in ``facetorch_models`` (fetched by facetorch's downloader when missing only if ``facetorch_download``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if not insightface:
        notes.append("no --insightface: ID similarity left out")
    if not smirk:
        notes.append("no --smirk: 3D Exp-MSE left out")
    if not landmarker:
        notes.append("no --landmarker (MediaPipe face_landmarker.task): Exp and LMS left out")
    if not emonet:
        notes.append("no --emonet: FaceCrafter's V/A/Dist-RMSE and Class-ACC left out")
    facetorch_annotator = None
    if facetorch:
        try:
            facetorch_annotator = facetorch_metrics.FacetorchAnnotator(facetorch_models, device, facetorch_download)
        except facetorch_metrics.FacetorchMissing as error:
            raise SystemExit(f"--facetorch: {error}") from error
        notes.append("Em. Acc., AU-MSE, VA-MSE: facetorch's FER, AU and VA models from "
                     f"{facetorch_annotator.models_dir}, on " + ("--insightface's face box" if insightface else
                                                                 "the whole picture (no --insightface face box)"))
    else:
        notes.append("no --facetorch: Arc2Face-Exp's Em. Acc., AU-MSE and VA-MSE left out")
    annotator = ImageAnnotator(insightface, smirk, landmarker, provider, det_size,
                               recognizer=recognizer_for(insightface, recognizer, paper_table), emonet=emonet,
                               facetorch=facetorch_annotator)
    if annotator.analyzer is not None:
        notes.append(f"ID similarity measured with {annotator.analyzer.recognizer_path.name}")
    liqe = lpips = None
    if liqe_weights:
        try:
            liqe = metrics.liqe_scorer(liqe_weights, device)
        except metrics.OptionalMetricMissing as error:
            notes.append(f"LIQE left out: {error}")
    if lpips_backbone:
        try:
            lpips = metrics.lpips_distance(lpips_backbone, device=device)
        except metrics.OptionalMetricMissing as error:
            notes.append(f"LPIPS diversity left out: {error}")
    pairs = pair(list_images(generated_folder), load_targets(targets_path), pair_by)
    rows, cache, compared = [], {}, []
    groups: dict[str, list] = {}
    group_images: dict[str, list] = {}
    from tqdm import tqdm

    for path, entry in tqdm(pairs, desc="evaluate", unit="image"):
        image = read_image(str(path))
        generated = annotator(image) if image is not None else {"error": "unreadable picture"}
        target = target_fields(entry, annotator, cache)
        row = {"generated": path.name, "target": entry.get("name", "")}
        row |= score_pair(generated, target)
        if liqe is not None and image is not None:
            row["liqe"] = liqe(image)
        row["error"] = generated.get("error", "")
        rows.append(row)
        compared.append((target, generated))
        identity = str(entry.get("identity") or entry.get("identity_image") or "")
        if identity and image is not None:
            groups.setdefault(identity, []).append(generated)
            group_images.setdefault(identity, []).append(image)
    columns = [c for c in METRIC_COLUMNS if any(c in row for row in rows)]
    with open(out / "per_sample.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["generated", "target", *columns, "error"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in writer.fieldnames})
    summary = {"pairs": len(rows), "failed": sum(1 for r in rows if r["error"]), "metrics": metrics.summarise(rows, columns)}
    summary["metrics"] |= set_metrics(compared)
    summary["metrics"] |= diversity(groups, group_images, lpips)
    if real:
        try:
            summary["metrics"]["fid"] = {"value": compute_fid(real, [p for p, _ in pairs], inception_weights, fid_backend, device)}
        except metrics.InceptionWeightsMissing as error:
            notes.append(f"FID left out: {error}")
    summary["notes"] = notes
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def format_table(summary: Mapping) -> str:
    lines = ["| metric | mean | std | n |", "|---|---|---|---|"]
    for name, values in summary["metrics"].items():
        if "value" in values:
            lines.append(f"| {name} | {values['value']:.4f} | | {values.get('count', '')} |")
        else:
            lines.append(f"| {name} | {values['mean']:.4f} | {values['std']:.4f} | {values['count']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", required=True, help="folder of generated pictures (ComfyUI output works)")
    parser.add_argument("--targets", required=True, help="targets JSON, or a training.prepare manifest.json")
    parser.add_argument("--out", required=True, help="folder for per_sample.csv and summary.json")
    parser.add_argument("--insightface", help="antelopev2-style folder (ID similarity)")
    parser.add_argument("--recognizer", help="recogniser file in that folder (default: the --paper-table paper's, "
                        "glintr100.onnx for EmojiDiff and arcface.onnx for Arc2Face and FaceCrafter; without a table "
                        "arcface.onnx, else glintr100.onnx)")
    parser.add_argument("--smirk", help="SMIRK_em1.pt (3D Exp-MSE)")
    parser.add_argument("--landmarker", help="MediaPipe face_landmarker.task (Exp, LMS)")
    parser.add_argument("--real", help="folder of real pictures (FID)")
    parser.add_argument("--inception-weights", help="FID Inception weights: pt_inception-2015-12-05-6726825d.pth "
                        "(fid-inception backend) or torchvision's inception_v3_google-*.pth (torchvision backend)")
    parser.add_argument("--fid-backend", choices=("fid-inception", "torchvision", "pytorch-fid"), default="fid-inception",
                        help="fid-inception: torchmetrics/torch-fidelity's port of the FID network (comparable numbers)")
    parser.add_argument("--emonet", help="EmoNet checkpoint (FaceCrafter's V/A/Dist-RMSE and Class-ACC)")
    parser.add_argument("--facetorch", action="store_true",
                        help="Arc2Face-Exp's Em. Acc. (8 classes), AU-MSE and VA-MSE with facetorch's own models "
                             "(needs: python -m pip install --no-deps -r requirements-facetorch.txt)")
    parser.add_argument("--facetorch-models", default=str(facetorch_metrics.DEFAULT_MODELS),
                        help="folder of facetorch's model files in its own layout (predictor/fer/2/model.pt, "
                             "predictor/au/1/model.pt, predictor/va/1/model.pt; default %(default)s; "
                             "/opt/facetorch/models/torchscript works as it is)")
    parser.add_argument("--facetorch-download", action="store_true",
                        help="let facetorch's downloader fetch missing model files from the Hugging Face hub into "
                             "--facetorch-models (nothing is downloaded without it)")
    parser.add_argument("--liqe-weights", help="pyiqa's LIQE weights file (EmojiDiff's IQ column; needs pip install pyiqa)")
    parser.add_argument("--lpips-backbone", help="torchvision alexnet weights file (LPIPS diversity between samples "
                        "of one identity; entries name their identity with 'identity' or 'identity_image')")
    from .paper_tables import TABLES

    parser.add_argument("--paper-table", choices=tuple(TABLES),
                        help="print the paper's Table 1 rows (arc2face-reference/-ablation: Arc2Face-Exp's Tables 2/3; "
                             "emojidiff-stages: EmojiDiff's Tables 2-3; facecrafter-diversity: FaceCrafter's Table 2) "
                             "beside ours in the same columns, with the paper's evaluation protocol beside this run's "
                             "and what differs in our metrics")
    parser.add_argument("--pair-by", choices=("name", "order"), default="name")
    parser.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--det-size", type=int, default=640)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = evaluate(args.generated, args.targets, args.out, args.insightface, args.smirk, args.landmarker, args.real,
                       args.inception_weights, args.fid_backend, args.pair_by, args.provider, args.device,
                       args.recognizer, args.det_size, args.emonet, args.liqe_weights, args.lpips_backbone,
                       args.paper_table, facetorch=args.facetorch, facetorch_models=args.facetorch_models,
                       facetorch_download=args.facetorch_download)
    print(format_table(summary))
    if args.paper_table:
        from .paper_tables import describe_run, paper_table

        print()
        print(paper_table(args.paper_table, summary, describe_run(load_targets(args.targets))))
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
