"""A real ComfyUI server with this pack, and its own frontend in headless Chromium, for end-to-end tests.

The server is the ComfyUI checkout that ``workflows/run.py`` finds (``COMFYUI_PATH``), started as
``python main.py`` on 127.0.0.1 on a free port, with ``--base-directory`` a temporary folder whose
``custom_nodes`` holds a link to this pack (and to any other packs given) and whose ``input`` holds a photo,
as a user would have.
The frontend is ComfyUI's own (``comfyui-frontend-package``); the browser is Debian's ``chromium``
driven by Playwright (never a browser Playwright downloads itself).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "comfyui_expression_adapters"  # the folder name under custom_nodes; the templates are served under it
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
VIEWPORT = {"width": 2400, "height": 1500}


def chromium_path() -> str | None:
    explicit = os.environ.get("CHROMIUM_PATH")
    for candidate in (explicit, *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sample_photo() -> Path:
    """A real photo that ships with insightface (Tom_Hanks_54745.png)."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"


def placeholder_key(file_name: str) -> str:
    """A tensor name that makes a placeholder file the kind its loader lists (adapters.checkpoints.adapter_file_kind)."""
    if "lora" in file_name:
        return "placeholder.lora.down.weight"
    if "facecrafter" in file_name:
        return "lmk.placeholder.weight"
    if "e_adapter" in file_name:
        return "id.placeholder.weight"
    return "placeholder.weight"


def write_video(path: Path, picture) -> None:
    """A one-second video of ``picture`` (a PIL image), for workflows that start from a video file."""
    import cv2
    import numpy as np

    frame = cv2.cvtColor(np.asarray(picture.resize((256, 256))), cv2.COLOR_RGB2BGR)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8, (256, 256))
    for _ in range(8):
        writer.write(frame)
    writer.release()


class ComfyServer:
    """``python main.py`` of a ComfyUI checkout, with this pack, in a throw-away base directory."""

    def __init__(self, comfyui: Path, base: Path, input_files=("arc2face_person.jpg",), model_files=(), custom_nodes=(),
                 front_end_root: Path | None = None):
        """``custom_nodes``: other packs' folders, linked into the server's custom_nodes beside this pack.
        ``front_end_root``: the static files of another frontend build to serve (ComfyUI's ``--front-end-root``)
        instead of the one ComfyUI's requirements pin."""
        self.comfyui = Path(comfyui)
        self.base = Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.input_files = input_files
        self.model_files = model_files
        self.custom_nodes = [Path(folder).resolve() for folder in custom_nodes]
        self.front_end_root = front_end_root
        self.process: subprocess.Popen | None = None

    def _prepare(self) -> None:
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_FOLDER
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        for folder in self.custom_nodes:
            if not (self.base / "custom_nodes" / folder.name).exists():
                (self.base / "custom_nodes" / folder.name).symlink_to(folder, target_is_directory=True)
        (self.base / "input").mkdir(exist_ok=True)
        from PIL import Image

        photo = Image.open(sample_photo()).convert("RGB")
        for name in self.input_files:
            if name.endswith((".mp4", ".webm", ".mov")):
                write_video(self.base / "input" / name, photo)
            else:
                photo.save(self.base / "input" / name)
        # The files the workflows name, as placeholders, so each loader's list holds the workflow's choice
        # as it would for a user who put the files in place (their contents are never read here).
        for name in self.model_files:
            path = self.base / "models" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".safetensors"):
                import torch
                from safetensors.torch import save_file

                save_file({placeholder_key(name): torch.zeros(1)}, path)
            else:
                path.write_bytes(b"")
        # A returning user: no first-run template dialog, no tours, no new-release popups.
        settings = self.base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({
            "Comfy.TutorialCompleted": True,
            "Comfy.Release.Version": "99.0.0",
            "Comfy.Release.Status": "skipped",
            "Comfy.Release.Timestamp": 9999999999999,
            "Comfy.Validation.Workflows": True,
            "Comfy.Minimap.Visible": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 1,  # text stays drawn when the view is zoomed out to fit
        }))

    def __enter__(self) -> ComfyServer:
        self._prepare()
        command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--cpu",
                   "--base-directory", str(self.base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        if self.front_end_root is not None:
            command += ["--front-end-root", str(self.front_end_root)]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfyui, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + float(os.environ.get("COMFYUI_START_TIMEOUT", 300))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/object_info", timeout=5) as response:
                    self.object_info = json.loads(response.read())
                return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} in time:\n{self.log_text()[-4000:]}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get_json(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())


class Frontend:
    """ComfyUI's page in headless Chromium, recording console errors and error toasts."""

    def __init__(self, server: ComfyServer, executable: str, browser=None):
        """``browser``: another Frontend's open browser to open this page in (Playwright's sync API runs one per
        thread); it stays open when this page closes."""
        self.server = server
        self.executable = executable
        self.browser = browser
        self._playwright = None
        self.console_errors: list[str] = []
        self._in_flight, self._last_request_event = 0, time.monotonic()

    def __enter__(self) -> Frontend:
        from playwright.sync_api import sync_playwright

        if self.browser is None:
            self._playwright = sync_playwright().start()
            self.browser = self._playwright.chromium.launch(executable_path=self.executable, headless=True,
                                                            args=["--no-sandbox", "--disable-gpu"])
        self.page = self.browser.new_page(viewport=VIEWPORT)
        self.page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
        self.page.on("pageerror", lambda error: self.console_errors.append(f"page error: {error}"))
        self.page.on("request", lambda request: self._requests_in_flight(+1))
        self.page.on("requestfinished", lambda request: self._requests_in_flight(-1))
        self.page.on("requestfailed", lambda request: self._requests_in_flight(-1))
        self.page.goto(self.server.url, wait_until="load", timeout=180_000)
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=180_000)
        self.page.wait_for_load_state("networkidle", timeout=180_000)  # the start-up requests have all answered
        self.page.wait_for_timeout(1000)
        return self

    def __exit__(self, *exc) -> None:
        if self._playwright is None:  # the browser is another Frontend's
            self.page.close()
            return
        self.browser.close()
        self._playwright.stop()

    def load_workflow(self, workflow: dict, name: str) -> None:
        self.console_errors.clear()  # only what loading this workflow causes
        self.page.evaluate("async ([w, n]) => { await window.app.loadGraphData(w, true, true, n); }", [workflow, name])
        self.settle()  # image previews load, sizes settle

    def _requests_in_flight(self, change: int) -> None:
        self._in_flight += change
        self._last_request_event = time.monotonic()

    def settle(self, quiet: float = 0.25, timeout: float = 30.0) -> None:
        """Until no request of the page has been open or ended for ``quiet`` seconds (the previews have loaded and
        what they answered was handled), then two frames drawn: what the page shows now is what it will show."""
        deadline = time.monotonic() + timeout
        while self._in_flight > 0 or time.monotonic() - self._last_request_event < quiet:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page kept {self._in_flight} requests open for {timeout} s")
            self.page.wait_for_timeout(50)  # Playwright hands over the page's events while it waits
        self.page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")

    def node_boxes(self) -> list[dict]:
        """Each node's id, type, title, box [x, y, w, h] (title bar included) as the frontend laid it out,
        and the width its title needs."""
        return self.page.evaluate("""() => {
            const canvas = window.app.canvas;
            const ctx = canvas.ctx || document.createElement('canvas').getContext('2d');
            return window.app.graph.nodes.map(node => {
                const box = [node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                             node.size[0], node.size[1] + LiteGraph.NODE_TITLE_HEIGHT];
                ctx.save();
                ctx.font = node.titleFontStyle || (LiteGraph.NODE_TEXT_SIZE + 'px Arial');
                const titleWidth = ctx.measureText(node.getTitle ? node.getTitle() : node.title).width;
                ctx.restore();
                return {id: node.id, type: node.type, title: node.title, box,
                        size: Array.from(node.size), titleWidth,
                        titleHeight: LiteGraph.NODE_TITLE_HEIGHT};
            });
        }""")

    def version(self) -> str:
        """The version of the frontend this page runs, as it reports itself."""
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")

    def graph_to_prompt(self) -> dict:
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def error_toasts(self) -> list[str]:
        return self.page.locator(".p-toast-message-error").all_inner_texts()

    def dialogs(self) -> list[str]:
        return [text for text in self.page.locator(".p-dialog").all_inner_texts() if text.strip()]

    def issues(self) -> list[str]:
        """The "N issues found" overlay by which newer frontends (1.58.1) report missing nodes, models and inputs
        where 1.27.10 opens dialogs."""
        return [text for text in self.page.locator("[data-testid='error-overlay']").all_inner_texts() if text.strip()]

    def issue_details(self, group: str) -> str:
        """Opens the issues overlay's details and returns one group's text (``missing-node``, ``missing-model``...)."""
        self.page.locator("[data-testid='error-overlay-see-errors']").click()
        details = self.page.locator(f"[data-testid='error-group-{group}']")
        details.wait_for(timeout=30_000)
        return details.inner_text()

    def close_dialogs(self) -> None:
        self.page.keyboard.press("Escape")
        self.page.locator(".p-dialog").first.wait_for(state="hidden", timeout=5_000)

    def fit_view(self) -> dict:
        """Frames the whole graph, as a person would before looking at it; returns its rectangle on the page."""
        clip = self.page.evaluate("""() => {
            const canvas = window.app.canvas;
            const groups = window.app.graph.groups || window.app.graph._groups || [];
            let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
            const grow = b => { x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
                                x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); };
            for (const node of window.app.graph.nodes) grow([node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                                                             node.size[0], node.size[1] + LiteGraph.NODE_TITLE_HEIGHT]);
            for (const group of groups) grow(group._bounding || group.bounding);
            const el = canvas.canvas, rect = el.getBoundingClientRect(), margin = 20, top = 70;
            const scale = Math.min((rect.width - 2 * margin - 60) / (x1 - x0),
                                   (rect.height - 2 * margin - top) / (y1 - y0), 1.2);
            canvas.ds.scale = scale;
            canvas.ds.offset[0] = -x0 + (margin + 60) / scale;
            canvas.ds.offset[1] = -y0 + (margin + top) / scale;
            canvas.setDirty(true, true);
            canvas.draw(true, true);
            return {x: rect.left + 60, y: rect.top + top, width: (x1 - x0) * scale + 2 * margin,
                    height: (y1 - y0) * scale + 2 * margin};
        }""")
        self.settle()
        return clip

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), clip=clip)
        return path
