"""`restore ui`: serve the web app (`restorecli.webapp`) on this machine, for a browser.

The models load at start, before the server listens (missing weights or a bad model file end the
command with one line and exit 2, not the first visitor's request), and stay loaded. It listens on
127.0.0.1 unless `--host` says otherwise, opens a public Gradio share link only with `--share`, and
serves until Ctrl-C (or SIGTERM): the server stops, a job in progress is abandoned at its next
sampling step, the temp files are removed, exit 0.
"""

from __future__ import annotations

import threading
import warnings
from importlib.util import find_spec
from typing import Annotated

import typer

from ..errors import SetupError
from ..settings import LoadSettings
from .options import load_options
from .terminal import QuietOpt, VerboseOpt, use_verbosity

INSTALL_HINT = "pip install 'restorecli[ui]'  (installs Gradio)"
PORT_HINT = "another server is using it? choose another with --port"
#: Seconds Ctrl-C waits for the job on the device to reach its next sampling step and end.
STOP_WAIT = 60.0


@load_options
def ui_command(
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 serves every network interface (anyone who can reach this machine can use it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    share: Annotated[bool, typer.Option("--share", help="Also open a public *.gradio.live link through Gradio's share servers.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    *,
    load: LoadSettings,
) -> None:
    """Serve a web app: upload photos, adjust the settings, compare before and after, download.

    The model/hardware options are those of `restore` (the per-image settings are on the page).
    Example: `restore ui --device cuda`, then open http://127.0.0.1:7860; on a GPU server, first
    `ssh -L 7860:localhost:7860 server`."""
    out = use_verbosity(quiet, verbose)
    # the page's notes (gr.Warning) would also print as Python warnings on this terminal
    warnings.filterwarnings("ignore", category=UserWarning, module="gradio")
    if find_spec("gradio") is None:
        raise SetupError("`restore ui` needs Gradio, which is not installed", hint=INSTALL_HINT)
    from ..webapp.app import build_app, launch
    from ..webapp.jobs import Models, Workspace

    _check_port(host, port)  # before minutes of loading, not after
    models = Models(load)
    out.info("loading models...")
    models.start()
    stop = threading.Event()
    workspace = Workspace()
    demo = None
    try:
        demo = build_app(models, workspace, stop=stop)
        try:
            url = launch(demo, workspace, host=host, port=port, share=share)
        except OSError as exc:  # taken since the check
            raise SetupError(f"cannot listen on {host}:{port} ({exc})", hint=PORT_HINT) from None
        out.info(f"serving on {url}  (Ctrl-C stops)")
        if share and demo.share_url:
            out.info(f"public link: {demo.share_url}")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        out.info("stopping...")
    finally:
        stop.set()  # a job in progress ends at its next sampling step
        if demo is not None:
            demo.close()
        models.wait_idle(timeout=STOP_WAIT)
        workspace.remove()
    raise typer.Exit(0)


def _check_port(host: str, port: int) -> None:
    """SetupError when `host:port` cannot be listened on (taken, or not an address of this machine)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SetupError(f"cannot listen on {host}:{port} ({reason.lower()})", hint=PORT_HINT) from None
