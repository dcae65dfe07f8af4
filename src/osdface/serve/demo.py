"""The web demo (Gradio, the field's convention for face restorers) over :class:`~osdface.serve.engine.RestoreEngine`.

Upload a photo, pick the options of ``osdface restore``, see before/after (a slider) and the restored
face crops, download the result. It runs offline: Gradio's analytics are off, the theme uses system
fonts (the default theme would fetch Inter from Google Fonts), server-side rendering (which needs
Node) is off, and Gradio's front end ships inside the package. The browser test
(``tests/serve/test_demo_browser.py``) records every request the page makes and checks that none
leaves the machine.

Requests from several browser tabs go through the same engine, so their faces share model batches.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections import deque
from pathlib import Path

from .config import RequestError, RestoreOptions
from .engine import RestoreEngine

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MODES = ("whole photo", "aligned face crop")
#: system font stacks (no web fonts)
SANS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


def demo_theme():
    """Gradio's default theme with system fonts only."""
    import gradio as gr

    return gr.themes.Default(font=SANS, font_mono=MONO)


class DemoDownloads:
    """Result files handed to Gradio's download box: a private temp folder, server-chosen names, the last
    ``keep`` files kept (Gradio copies each into its own cache, which ``delete_cache`` ages out)."""

    def __init__(self, keep: int = 32) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="osdface-demo-")
        self._files: deque[Path] = deque()
        self.keep = keep

    def write(self, data: bytes, ext: str) -> str:
        path = Path(self._dir.name) / f"restored-{uuid.uuid4().hex[:12]}.{ext}"
        path.write_bytes(data)
        self._files.append(path)
        while len(self._files) > self.keep:
            self._files.popleft().unlink(missing_ok=True)
        return str(path)

    def cleanup(self) -> None:
        self._dir.cleanup()


def build_demo(engine: RestoreEngine):
    """The Gradio Blocks of the demo (``.launch(theme=demo_theme(), ssr_mode=False, ...)`` it; see :func:`launch_demo`)."""
    import gradio as gr

    cfg = engine.config
    downloads = DemoDownloads()

    async def restore(image_path, mode, upscale, color_fix, only_center, fmt):
        if not image_path:
            raise gr.Error("Upload a photo first.")
        aligned = mode == MODES[1]
        try:
            options = RestoreOptions(aligned=aligned, upscale=1.0 if aligned else float(upscale), color_fix=color_fix,
                                     only_center_face=bool(only_center), format=fmt)
            # the file's bytes, as the API gets them: the engine reads the size from the header (--max-pixels)
            # before decoding; the upload's size is bounded by Gradio's max_file_size (--max-upload-mb)
            data = Path(image_path).read_bytes()
            out = await engine.restore(data, options)
        except RequestError as e:
            raise gr.Error(e.message) from None
        before = out.input_rgb
        if before.shape[:2] != out.image.shape[:2]:
            import cv2

            before = cv2.resize(before, (out.image.shape[1], out.image.shape[0]), interpolation=cv2.INTER_LANCZOS4)
        if aligned:
            crops = [(out.image, "restored crop")]
            status = f"Aligned crop restored in {out.seconds:.2f} s."
        else:
            crops = [(f.restored, f"face {i + 1} (score {f.detection.score:.2f})") for i, f in enumerate(out.faces)]
            status = (f"{len(out.faces)} face(s) restored in {out.seconds:.2f} s." if out.faces
                      else "No face found; the photo is returned as it was (upscaled if asked).")
        return (before, out.image), crops, downloads.write(out.encoded, fmt), status

    with gr.Blocks(title="osdface demo", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown("## OSDFace — one-step diffusion face restoration\nUpload a photo with faces (or an "
                    "FFHQ-aligned face crop), pick the options and press **Restore**.")
        with gr.Row():
            with gr.Column(scale=1):
                # a file path with no image_mode: Gradio only opens the header, never decodes the upload (the
                # engine checks --max-pixels before it decodes)
                inp = gr.Image(type="filepath", image_mode=None, label="Input photo", sources=["upload", "clipboard"],
                               elem_id="input-image")
                mode = gr.Radio(list(MODES), value=MODES[0], label="Input is")
                upscale = gr.Slider(1, cfg.max_upscale, value=1, step=0.5, label="Upscale (whole photos)")
                color_fix = gr.Radio(["wavelet", "adain", "none"], value="wavelet", label="Colour fix")
                only_center = gr.Checkbox(False, label="Only the centre face")
                fmt = gr.Radio(["png", "jpeg", "webp"], value="png", label="Download format")
                button = gr.Button("Restore", variant="primary", elem_id="restore-button")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(label="Before / after", type="numpy", elem_id="before-after")
                status = gr.Markdown(elem_id="status")
                faces = gr.Gallery(label="Restored faces", columns=6, height=240, object_fit="contain", elem_id="faces")
                download = gr.File(label="Download", elem_id="download")
        button.click(restore, [inp, mode, upscale, color_fix, only_center, fmt], [slider, faces, download, status],
                     concurrency_limit=cfg.max_queue)
    demo.osdface_downloads = downloads
    return demo


def launch_demo(demo, host: str, port: int, max_upload_bytes: int, block: bool = True):
    """Launch offline on ``host:port`` (no share link, no SSR, system fonts); returns Gradio's launch tuple."""
    return demo.launch(server_name=host, server_port=port, share=False, theme=demo_theme(), ssr_mode=False,
                       max_file_size=max_upload_bytes, prevent_thread_lock=not block, quiet=not block,
                       footer_links=[], inbrowser=False)
