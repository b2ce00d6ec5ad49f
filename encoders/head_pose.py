"""Head pose (yaw, pitch, roll in degrees) from MediaPipe's facial transformation matrix.

MediaPipe's FaceLandmarker returns, per face, a 4 x 4 matrix taking its canonical face model into
camera space (x to the image's right, y up, z towards the camera). Its rotation part R (columns
rescaled to unit length, in case the matrix carries a scale) is read as

    R = Rz(roll) @ Ry(yaw) @ Rx(pitch)

with the right-handed rotations Rx(a) = [[1,0,0],[0,c,-s],[0,s,c]], Ry(a) = [[c,0,s],[0,1,0],[-s,0,c]],
Rz(a) = [[c,-s,0],[s,c,0],[0,0,1]]. Then R[2,0] = -sin(yaw), R[2,1] = cos(yaw) sin(pitch),
R[2,2] = cos(yaw) cos(pitch), R[1,0] = sin(roll) cos(yaw), R[0,0] = cos(roll) cos(yaw). A mirrored
picture negates yaw and roll and keeps pitch. Angles are for comparing poses (FaceCrafter's
same-pose pairs); their zero is MediaPipe's canonical frontal face.
"""

from __future__ import annotations

import numpy as np


def head_pose_from_matrix(matrix) -> np.ndarray:
    """(yaw, pitch, roll) in degrees from a 4 x 4 (or 3 x 3) transformation matrix; ... x 3 for a batch."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[-2:] not in ((4, 4), (3, 3)):
        raise ValueError(f"expected 4 x 4 or 3 x 3 matrices; got shape {m.shape}")
    rotation = m[..., :3, :3]
    norms = np.linalg.norm(rotation, axis=-2, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("the transformation matrix has a zero or non-finite rotation part")
    r = rotation / norms
    yaw = np.arctan2(-r[..., 2, 0], np.hypot(r[..., 2, 1], r[..., 2, 2]))
    pitch = np.arctan2(r[..., 2, 1], r[..., 2, 2])
    roll = np.arctan2(r[..., 1, 0], r[..., 0, 0])
    return np.degrees(np.stack([yaw, pitch, roll], axis=-1))
