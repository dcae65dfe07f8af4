"""Named constants of the OSDFace method (docs/method.md §2) and of FFHQ-style face alignment."""

from __future__ import annotations

#: Side of the aligned face crop the released model was trained on (pixels).
FACE_SIZE = 512

#: Fixed UNet timestep of the one-step forward (`infer.py`: ``self.timesteps = 399``).
TIMESTEP = 399

#: Faces per pipeline call by default, the same in the CLI (``--batch-size``) and the API
#: (``FaceRestorer(batch_size=...)``): 1 keeps every face's output independent of which faces share a
#: call (batched kernels differ in float summation order); raise it for throughput on a GPU.
DEFAULT_BATCH_SIZE = 1

#: Number of visual-prompt tokens (replaces CLIP's 77 text tokens).
NUM_PROMPT_TOKENS = 77

#: alpha-bar at t = 399 for SD-2.1-base's scaled-linear schedule (float32 cumprod), docs/method.md §2.6.
ALPHA_CUMPROD_399 = 0.4260861277580261

#: FFHQ 5-point template (left eye, right eye, nose tip, left mouth corner, right mouth corner)
#: for a 512x512 crop, in (x, y) pixels; the facexlib / GFPGAN / CodeFormer template.
FFHQ_TEMPLATE_512 = (
    (192.98138, 239.94708),
    (318.90277, 240.19360),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)

#: Largest image (in pixels) we decode; PIL's own bomb guard warns at 89 MP and errors at 179 MP.
MAX_IMAGE_PIXELS = 16384 * 16384 // 2

#: Image file extensions picked up when a folder is given as input.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
