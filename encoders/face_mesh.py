"""Index tables of the MediaPipe 478-point face mesh (pure data, no dependencies).

Regions are given as polylines (each consecutive pair is one edge). Their edge sets equal
MediaPipe's ``FaceLandmarksConnections.FACE_LANDMARKS_*`` tables (a test checks this where
mediapipe is installed). "left"/"right" are the subject's, as in MediaPipe: the subject's
right eye (points 33..133, iris centre 468) appears on the image's left in a frontal photo.
"""

from __future__ import annotations

NUM_LANDMARKS = 478

REGION_POLYLINES: dict[str, tuple[tuple[int, ...], ...]] = {
    "face_oval": (
        (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
         148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109, 10),
    ),
    "right_eyebrow": ((46, 53, 52, 65, 55), (70, 63, 105, 66, 107)),
    "left_eyebrow": ((276, 283, 282, 295, 285), (300, 293, 334, 296, 336)),
    "right_eye": (
        (33, 7, 163, 144, 145, 153, 154, 155, 133),
        (33, 246, 161, 160, 159, 158, 157, 173, 133),
    ),
    "left_eye": (
        (263, 249, 390, 373, 374, 380, 381, 382, 362),
        (263, 466, 388, 387, 386, 385, 384, 398, 362),
    ),
    "right_iris": ((469, 470, 471, 472, 469),),
    "left_iris": ((474, 475, 476, 477, 474),),
    "nose": (
        (168, 6, 197, 195, 5, 4, 1, 19, 94, 2),
        (98, 97, 2, 326, 327, 294, 278, 344, 440, 275, 4, 45, 220, 115, 48, 64, 98),
    ),
    "lips": (
        (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291),
        (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291),
        (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308),
        (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308),
    ),
}

REGIONS: tuple[str, ...] = tuple(REGION_POLYLINES)

# MediaPipe's connection table name for each region
MEDIAPIPE_CONNECTION_NAMES: dict[str, str] = {
    "face_oval": "FACE_LANDMARKS_FACE_OVAL",
    "right_eyebrow": "FACE_LANDMARKS_RIGHT_EYEBROW",
    "left_eyebrow": "FACE_LANDMARKS_LEFT_EYEBROW",
    "right_eye": "FACE_LANDMARKS_RIGHT_EYE",
    "left_eye": "FACE_LANDMARKS_LEFT_EYE",
    "right_iris": "FACE_LANDMARKS_RIGHT_IRIS",
    "left_iris": "FACE_LANDMARKS_LEFT_IRIS",
    "nose": "FACE_LANDMARKS_NOSE",
    "lips": "FACE_LANDMARKS_LIPS",
}

RIGHT_IRIS_CENTRE = 468
LEFT_IRIS_CENTRE = 473

# outer lip contour (mouth corners 61 and 291)
LIPS_OUTER: tuple[int, ...] = REGION_POLYLINES["lips"][0] + REGION_POLYLINES["lips"][1][1:-1]


def region_edges(region: str) -> list[tuple[int, int]]:
    """The (start, end) edges of a region's polylines."""
    if region not in REGION_POLYLINES:
        raise KeyError(f"unknown face region {region!r}; known: {', '.join(REGIONS)}")
    return [(a, b) for line in REGION_POLYLINES[region] for a, b in zip(line[:-1], line[1:])]


def region_points(region: str) -> list[int]:
    """The sorted landmark indices a region's polylines pass through."""
    if region not in REGION_POLYLINES:
        raise KeyError(f"unknown face region {region!r}; known: {', '.join(REGIONS)}")
    return sorted({i for line in REGION_POLYLINES[region] for i in line})


def tesselation_edges() -> list[tuple[int, int]]:
    """The full mesh triangulation edges (2556), read from the installed mediapipe package."""
    from .optional import require

    vision = require("mediapipe.tasks.python.vision", "Drawing the full face mesh")
    return [(c.start, c.end) for c in vision.FaceLandmarksConnections.FACE_LANDMARKS_TESSELATION]
