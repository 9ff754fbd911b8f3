"""`selfextend serve`: the OpenAI API on this machine, with SelfExtend behind it."""

from typing import Annotated, Optional

import typer

from selfextend_mlx.defaults import MAX_TOKENS, PREFILL_STEP

from .common import document_cache, load_model
from .options import (
    CacheDirOpt,
    CacheMaxOpt,
    GroupSizeOpt,
    KvBitsOpt,
    ModelOpt,
    NoCacheOpt,
    PrefillStepOpt,
    TrustRemoteCodeOpt,
    WindowOpt,
)
from .output import log_lines, status

ENV_API_KEY = "SELFEXTEND_API_KEY"


def _size(what: str):
    def parse(value) -> int:
        from selfextend_mlx.errors import SelfExtendError
        from selfextend_mlx.planning import parse_size

        if str(value).strip() == "0":
            return 0
        try:
            return parse_size(value, what)
        except SelfExtendError as error:
            raise typer.BadParameter(str(error)) from None

    return parse


def _finite(value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise typer.BadParameter(f"{value} is not a number")
    return value


def serve(
    model: ModelOpt = None,
    host: Annotated[
        str,
        typer.Option(
            "--host", metavar="HOST", help="Address to listen on; anything but localhost is reachable by others."
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="Port (0: any free one).")
    ] = 8080,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar=ENV_API_KEY,
            metavar="KEY",
            help=f"Require 'Authorization: Bearer KEY' on every API request (or set ${ENV_API_KEY}).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option(
            "--name", metavar="NAME", help="The model id the API lists (default: the model's name).", show_default=False
        ),
    ] = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens", "-n", min=1, metavar="N", help="Answer budget of requests that give no max_tokens."
        ),
    ] = MAX_TOKENS,
    temp: Annotated[
        float,
        typer.Option(
            "--temp",
            "-t",
            min=0.0,
            max=2.0,
            callback=_finite,
            metavar="T",
            help="Temperature of requests that give none (0: always the likeliest token).",
        ),
    ] = 0.0,
    top_p: Annotated[
        float,
        typer.Option(
            "--top-p", min=0.0, max=1.0, callback=_finite, metavar="P", help="top_p of requests that give none."
        ),
    ] = 1.0,
    kv_bits: KvBitsOpt = None,
    prefill_step_size: PrefillStepOpt = PREFILL_STEP,
    cache_size: Annotated[
        int,
        typer.Option(
            "--cache-size",
            parser=_size("--cache-size"),
            metavar="SIZE",
            help="Memory for the KV caches of recent requests, reused by requests that share their start "
            "(least recently used out; the newest always stays while memory allows).",
        ),
    ] = "2GB",
    queue_size: Annotated[
        int, typer.Option("--queue-size", min=0, metavar="N", help="Requests that may wait behind the running one.")
    ] = 16,
    max_request_size: Annotated[
        int,
        typer.Option(
            "--max-request-size", parser=_size("--max-request-size"), metavar="SIZE", help="Largest request body."
        ),
    ] = "16MB",
    allow_origin: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allow-origin",
            metavar="ORIGIN",
            help="Let web pages from ORIGIN call the API (CORS), e.g. http://localhost:3000; repeatable.",
            show_default=False,
        ),
    ] = None,
    allow_host: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allow-host",
            metavar="NAME",
            help="Answer requests sent to this host name too (besides IP addresses, localhost and --host); "
            "'*' for any. Other names are refused (DNS rebinding); repeatable.",
            show_default=False,
        ),
    ] = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    cache_max: CacheMaxOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
):
    """Serve a model through the OpenAI API, SelfExtend included: for Open WebUI, `llm`, editors, scripts.

    POST /v1/chat/completions and /v1/completions (streamed or not), GET /v1/models and /health.
    Each request is planned as `selfextend ask` plans a run (plain attention while it fits the
    model, the smallest G beyond), requests run one at a time in order, and a second question
    about the same document reads only the question: the document's KV cache is kept in memory
    and in the document cache. Ctrl-C stops the server. See docs/server.md.

    Examples:

    \b
        selfextend serve
        selfextend serve -m SmolLM2-135M-Instruct --port 8000 --api-key secret
        curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
            -d '{"messages": [{"role": "user", "content": "Hi"}]}'
    """
    from selfextend_mlx.errors import SelfExtendError
    from selfextend_mlx.loading.distributed import ranks
    from selfextend_mlx.server.app import ServerOptions
    from selfextend_mlx.server.engine import Engine, EngineOptions
    from selfextend_mlx.server.runner import bind, is_local
    from selfextend_mlx.server.runner import serve as run_server

    if ranks() > 1:
        raise SelfExtendError("selfextend serve runs on one machine: start it without mlx.launch")
    sock = bind(host, port)  # a port in use fails now, not after the model has loaded
    if not is_local(host):
        warning = f"warning: listening on {host}: other machines can reach this server"
        status(warning + ("" if api_key else " and use the model without a key (set --api-key)"))
    loaded_model, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    engine_options = EngineOptions(
        group_size=group_size,
        window=window,
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        kv_bits=kv_bits,
        prefill_step_size=prefill_step_size,
        cache_bytes=cache_size,
        queue_size=queue_size,
    )
    engine = Engine(
        loaded_model, tokenizer, engine_options, doc_cache=document_cache(cache_dir, no_cache, cache_max), log=log_lines
    )
    server_options = ServerOptions(
        host=host,
        port=port,
        api_key=api_key or None,
        name=name,
        max_request_bytes=max_request_size,
        allow_origins=tuple(allow_origin or ()),
        allow_hosts=tuple(allow_host or ()),
    )

    def ready(url: str) -> None:
        from .output import display_name, terminal_text

        key = ", API key required" if api_key else ""
        print(
            f"serving {terminal_text(display_name(engine.info.model_id))} at {url} (OpenAI API{key}); Ctrl-C to stop",
            flush=True,
        )

    run_server(engine, server_options, log=log_lines, on_ready=ready, sock=sock)
    status("stopped")


def register(app: typer.Typer) -> None:
    app.command()(serve)
