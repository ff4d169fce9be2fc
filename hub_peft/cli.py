"""The ``hub-peft`` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .bridges import LORA_METHODS
from .errors import HubPeftError, InvalidInputError


def _say_quantization(model) -> None:
    """On stderr, after a 4-bit load: how many linear layers of the decoder blocks really are NF4."""
    source = getattr(model, "hub_peft_source", None)
    if source is not None and source.four_bit_layers is not None:
        done, total = source.four_bit_layers.split("/")
        state = "NF4 4-bit" if source.quantization else "full precision (none could be quantized)"
        print(f"base: {done} of {total} decoder linear layers in 4-bit; recorded as {state}", file=sys.stderr)


def _cmd_chat(args: argparse.Namespace) -> int:
    from .adapters import load_adapters
    from .base_model import load_base_model
    from .chat import generate_reply, require_chat_adapters

    require_chat_adapters(args.adapter or [])  # before the base loads: chat runs causal LM adapters only
    model, tokenizer = load_base_model(args.base, load_in_4bit=args.load_in_4bit)
    _say_quantization(model)
    if args.adapter:
        model = load_adapters(model, args.adapter)
    print(
        generate_reply(
            model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, sample=args.sample, raw=args.raw
        )
    )
    return 0


def _cmd_hub_serve(args: argparse.Namespace) -> int:
    from .hub.server import serve
    from .hub.tokens import parse_tokens, read_tokens_file

    specs = list(args.token or [])
    sources = [f"--token #{i + 1}" for i in range(len(specs))]  # errors name the entry, never its text
    if args.tokens_file:
        lines = read_tokens_file(args.tokens_file)  # refuses a file other users can read, and bad lines
        specs += lines
        sources += [f"Entry {i + 1} of the tokens file {args.tokens_file}" for i in range(len(lines))]
    if args.tokens_file is None and not specs and os.environ.get("HUB_PEFT_HUB_TOKENS"):
        specs = os.environ["HUB_PEFT_HUB_TOKENS"].split(",")
        sources = [f"Entry {i + 1} of $HUB_PEFT_HUB_TOKENS" for i in range(len(specs))]
    serve(
        args.root,
        host=args.host,
        port=args.port,
        tokens=parse_tokens(specs, sources),
        log_level=args.log_level,
        session_idle_s=args.session_idle_seconds,
        session_max_s=args.session_max_seconds,
    )
    return 0


def _parse_adapter_spec(spec: str) -> tuple[str, str, str | None, str | None]:
    """``NAME=SPEC`` -> ``(name, source, revision, subfolder)``, SPEC read by
    :func:`hub_peft.adapters.parse_adapter_spec`."""
    from .adapters import parse_adapter_spec
    from .errors import InvalidInputError

    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
        raise InvalidInputError(f"--adapter takes NAME=REPO_ID[@REVISION][:SUBFOLDER] (or NAME=FOLDER), got {spec!r}.")
    return (name, *parse_adapter_spec(source))


def _cmd_serve(args: argparse.Namespace) -> int:
    """Serve many adapters over one base model behind an OpenAI-compatible API."""
    import uvicorn
    from tqdm import tqdm

    from ._args import from_args
    from .base_model import DEFAULT_BASE, load_base_model
    from .errors import InvalidInputError
    from .serving import MultiAdapterModel, ServerSettings, create_app

    adapters = [_parse_adapter_spec(spec) for spec in args.adapter or []]
    if args.engine == "vllm":
        return _serve_on_vllm(args, adapters)
    if args.vllm_args or args.print_command:
        raise InvalidInputError(f"{' '.join(args.vllm_args) or '--print-command'}: only with --engine vllm.")
    base = load_base_model(args.base, load_in_4bit=args.load_in_4bit)
    _say_quantization(base[0])
    engine = MultiAdapterModel(
        base,
        memory_budget=int(args.memory_budget_mb * 2**20),
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
        head_bits=8 if args.int8_head else None,
    )
    for name, source, revision, subfolder in tqdm(
        adapters, desc="loading adapters", unit="adapter", disable=not adapters
    ):
        engine.add(name, source, revision, subfolder=subfolder, pin=True)
    settings = from_args(
        ServerSettings,
        args,
        base_name=args.base or DEFAULT_BASE,
        admin_token=os.environ.get("HUB_PEFT_ADMIN_TOKEN") or None,
        adapter_dirs=args.adapter_dir or (),
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    app = create_app(engine, settings, start_scheduler=False)
    base_name = settings.base_name
    print(f"Serving {base_name} with {len(adapters)} adapter(s) on http://{args.host}:{args.port}/v1", flush=True)
    # The model's steps run here, on the thread that loaded it; HTTP gets a thread of its own that never
    # computes (a second computing thread makes libgomp's waits sleep, which slows every step; see
    # Scheduler.serve_forever). uvicorn installs no signal handlers off the main thread, so SIGINT and
    # SIGTERM stop it from here.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    http = threading.Thread(target=server.run, name="hub-peft-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    http.start()
    try:
        app.state.scheduler.serve_forever(until=lambda: not http.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        http.join(timeout=10)
    if not server.started:
        print(f"The HTTP server did not start on {args.host}:{args.port} (its error is above).", file=sys.stderr)
        return 1
    return 0


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve_on_vllm(args: argparse.Namespace, adapters: list[tuple[str, str, str | None, str | None]]) -> int:
    """vLLM's OpenAI server with the same adapters, each checked with ``validate --for vllm`` first."""
    from .serving.vllm_launch import plan_vllm

    launch = plan_vllm(
        args.base,
        adapters,
        python=args.vllm_python,
        host=args.host,
        port=args.port,
        extra=args.vllm_args,
        check_installed=not args.print_command,
    )
    if args.print_command:
        print(launch.printable())
        return 0
    print(
        f"Starting vLLM with {len(launch.adapters)} LoRA adapter(s), --max-lora-rank {launch.max_lora_rank}: "
        f"{launch.printable()}",
        flush=True,
    )
    # vLLM replaces this process: signals (Ctrl+C, a supervisor's SIGTERM) reach it and its workers directly,
    # and the environment (HF_ENDPOINT, HF_TOKEN) passes through unchanged.
    os.execv(launch.command[0], launch.command)


def _cmd_space_push(args: argparse.Namespace) -> int:
    from .space import push_space

    print(f"Building the hub_peft wheel and pushing the Adapter Studio to the Space {args.repo_id}...", flush=True)
    print(push_space(args.repo_id, private=args.private, hardware=args.hardware))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Start the local Hub and show the default base model, in 4-bit, answering a chat prompt."""
    import secrets

    from .base_model import DEFAULT_BASE, load_base_model
    from .chat import generate_reply
    from .hub import start_local_hub

    root = Path(args.hub_root or Path(tempfile.gettempdir()) / "hub_peft_local_hub")
    token = secrets.token_urlsafe(24)
    hub = start_local_hub(root, tokens={args.user: token}, port=args.port)
    try:
        print(f"Local Hub started: {hub.endpoint}  (storage: {root}, log: {hub.log_path})")
        print(f"  use it with: HF_ENDPOINT={hub.endpoint}  user '{args.user}' (its token is in this process only)")
        started = time.perf_counter()
        print(f"Loading base model {DEFAULT_BASE} in 4-bit (NF4, bitsandbytes, CPU)...", flush=True)
        model, tokenizer = load_base_model(None, load_in_4bit=True)
        source = model.hub_peft_source
        print(f"  loaded in {time.perf_counter() - started:.1f}s from {source.local_path}")
        print(f"  weights: {source.hub_id}, converted from {source.converted_from}")
        print(f"\nuser> {args.prompt}")
        print(f"assistant> {generate_reply(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)}\n")
        if args.exit:
            return 0
        print(f"Local Hub still serving on {hub.endpoint}; press Ctrl+C to stop.", flush=True)
        while hub.process.poll() is None:
            time.sleep(1)
        return hub.process.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        hub.stop()


def _cmd_studio(args: argparse.Namespace) -> int:
    """Start the local Hub and the Adapter Studio Space on the embedded base model."""
    import runpy
    import secrets
    import signal

    from .hub import start_local_hub

    app = Path(__file__).resolve().parents[1] / "spaces" / "adapter_studio" / "app.py"
    if not app.is_file():
        raise HubPeftError(f"{app} is missing: run the studio from a hub_peft checkout (the Space lives in spaces/).")
    hub = None
    if not args.no_local_hub:
        root = Path(args.hub_root or Path(tempfile.gettempdir()) / "hub_peft_local_hub")
        token = secrets.token_urlsafe(24)
        hub = start_local_hub(root, tokens={args.user: token}, port=args.hub_port)
        os.environ["HF_ENDPOINT"] = hub.endpoint  # before huggingface_hub is imported by the app
        os.environ["HF_TOKEN"] = token  # pushes as USER without typing the token; never shown or logged
        print(f"Local Hub: {hub.endpoint} (storage {root}); push to '{args.user}/...' from the Studio.", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the finally below stops the Hub
    os.environ["GRADIO_SERVER_PORT"] = str(args.port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    print(f"Adapter Studio: http://127.0.0.1:{args.port}  (Ctrl+C to stop)", flush=True)
    try:
        runpy.run_path(str(app), run_name="__main__")
    except KeyboardInterrupt:
        pass
    finally:
        if hub is not None:
            hub.stop()
    return 0


def _local_or_pulled(target: str) -> Path:
    """The folder of ``target``: a folder, or ``REPO[@REVISION][:SUBFOLDER]`` downloaded."""
    from .adapters import fetch_adapter, parse_adapter_spec

    source, revision, subfolder = parse_adapter_spec(target)
    return fetch_adapter(source, revision=revision, subfolder=subfolder, check=False)


def _cmd_push(args: argparse.Namespace) -> int:
    from .adapters import push_adapter

    print(push_adapter(args.dir, args.repo_id, private=args.private))
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from ._atomic import atomic_dir
    from .adapters import check_repo_id, fetch_adapter, parse_adapter_spec
    from .errors import InvalidInputError

    repo_id, revision, subfolder = parse_adapter_spec(args.repo_id)
    if revision and args.revision and revision != args.revision:
        raise InvalidInputError(
            f"Two revisions given ({revision!r} in {args.repo_id!r}, --revision {args.revision!r}); give one."
        )
    folder = fetch_adapter(check_repo_id(repo_id), revision=revision or args.revision, subfolder=subfolder)

    with atomic_dir(args.to, overwrite=args.overwrite) as tmp:
        for p in folder.iterdir():
            if p.is_file():
                (tmp / p.name).write_bytes(p.read_bytes())
    print(args.to)
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from .cards import write_card
    from .validate import card_facts

    print(write_card(args.dir, repo_id=args.repo_id, **card_facts(args.dir)))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .base_model import load_base_config
    from .validate import check_targets_in_base, validate_adapter

    base_config = load_base_config(args.base) if args.base else None
    folder = _local_or_pulled(args.target)
    try:
        report = validate_adapter(
            folder, for_engine=args.engine, base_config=base_config, base_name=args.base or "the given base model"
        )
        if base_config is not None:
            check_targets_in_base(report, base_config, args.base)
    except Exception as e:
        # NOTE(security): validate reads untrusted files and reports every problem it knows; anything else it
        # meets still ends as a FAIL line, never a traceback (nor an OK)
        print(
            f"FAIL: {args.target} could not be checked ({type(e).__name__}: {str(e)[:500]})\n"
            "      fix: re-save or re-download the adapter; report a bug if the files are sound"
        )
        return 1
    for warning in report.warnings:
        print(f"WARN: {warning}")
    if report.ok:
        print(
            f"OK: {args.target} is a valid {report.config.get('peft_type')} adapter"
            + (f" and {args.engine}-compatible" if args.engine else "")
            + (f" that fits {args.base}" if args.base else "")
        )
        return 0
    for problem in report.problems:
        print(f"FAIL: {problem.point}\n      fix: {problem.fix}")
    return 1


def _cmd_info(args: argparse.Namespace) -> int:
    from .adapters import adapter_info

    info = adapter_info(_local_or_pulled(args.target))
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {', '.join(value) if isinstance(value, list) else value}")
    return 0 if info["valid"] else 1


def _cmd_convert_bin(args: argparse.Namespace) -> int:
    from .adapters import convert_bin

    print(convert_bin(args.dir))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .bridges import MergeSpec, merge_adapters

    weights = _floats(args.weights, "--weights") if args.weights else [1.0 / len(args.adapters)] * len(args.adapters)
    spec = MergeSpec(args.method, args.density, args.svd_rank, args.majority_sign_method, args.seed)
    out = merge_adapters(args.adapters, weights, args.out, spec, overwrite=args.overwrite)
    print(f"Merged {len(args.adapters)} adapters ({args.method}) into {out}")
    if args.push:
        from .adapters import push_adapter

        print(push_adapter(out, args.push, private=args.private))
    return 0


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise InvalidInputError(f"{option} takes comma-separated numbers, such as 0.6,0.4; got {text!r}.") from None


def _cmd_export(args: argparse.Namespace) -> int:
    from .bridges.gguf import export_gguf
    from .validate.llamacpp import read_base_config

    base_config = read_base_config(args.base) if args.base else None
    out = export_gguf(
        args.adapter,
        args.out,
        base_config=base_config,
        dtype=args.dtype,
        ollama_from=args.ollama,
        overwrite=args.overwrite,
        base_weights=args.base_weights,
    )
    print(f"Wrote {out}" + (f" and {out.parent / 'Modelfile'}" if args.ollama else ""))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .bridges.convert import convert_to_lora

    out, error = convert_to_lora(args.adapter, args.out, rank=args.rank, overwrite=args.overwrite)
    print(
        f"Wrote {out}: a rank-{args.rank} LoRA. Reconstruction error of the weight updates, "
        f"||BA - dW|| / ||dW|| over {error['layers']} layers: mean {error['mean']:.3g}, "
        f"worst {error['max']:.3g} ({error['worst_layer']}); recorded on its card."
    )
    return 0


def _cmd_import_pyreft(args: argparse.Namespace) -> int:
    from .reft.pyreft_import import import_pyreft

    template = args.prompt_template.replace("\\n", "\n") if args.prompt_template else None
    out = import_pyreft(
        args.src, args.dst, base=args.base, positions=args.positions, prompt_template=template, overwrite=args.overwrite
    )
    print(out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.console import train_from_args

    return train_from_args(args, say_quantization=_say_quantization)


_SERVE_LIMITS = (  # hub-peft serve's limits: (option, help); type and default from ServerSettings
    ("--max-waiting", "Queued requests; beyond them HTTP 429."),
    ("--max-prompt-tokens", "Longest prompt in tokens; beyond: 413."),
    ("--default-max-tokens", "max_tokens of a chat request that gives none."),
    ("--request-timeout", "Seconds before a request is ended."),
    ("--adapter-load-timeout", "Seconds a request may wait for a Hub adapter to download and load; beyond: 504."),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub-peft", description="Share and serve adapters on the Hugging Face Hub.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="Answer a prompt with a base model (and adapters).")
    chat.add_argument("prompt")
    chat.add_argument("--base", default=None, help="Hub id or local path (default: embedded SmolLM2-135M-Instruct).")
    chat.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="Load the base in NF4 4-bit.")
    chat.add_argument(
        "--adapter",
        action="append",
        metavar="REPO_ID[@REVISION][:SUBFOLDER]",
        help="Adapter repo or folder (repeatable).",
    )
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--sample", action="store_true", help="Sample instead of greedy decoding.")
    chat.add_argument("--raw", action="store_true", help="Feed PROMPT as is, without the chat template.")
    chat.set_defaults(func=_cmd_chat)

    hub = sub.add_parser("hub", help="The local Hub server.").add_subparsers(dest="hub_command", required=True)
    serve = hub.add_parser("serve", help="Serve a local Hub (huggingface_hub-compatible HTTP API).")
    serve.add_argument("--root", required=True, help="Folder holding the repos.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7861)
    serve.add_argument("--token", action="append", metavar="USER=TOKEN", help="A user's write token (repeatable).")
    serve.add_argument("--tokens-file", help="File with one USER=TOKEN per line, mode 600 (readable by you only).")
    serve.add_argument(
        "--session-idle-seconds",
        type=float,
        default=2 * 3600.0,
        help="A browser session ends after this long without a request (default: 2 h).",
    )
    serve.add_argument(
        "--session-max-seconds",
        type=float,
        default=12 * 3600.0,
        help="A browser session ends this long after its log-in (default: 12 h).",
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_cmd_hub_serve)

    push = sub.add_parser("push", help="Push an adapter folder to the Hub (one atomic commit, card refreshed).")
    push.add_argument("dir")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.set_defaults(func=_cmd_push)
    pull = sub.add_parser(
        "pull", help="Download an adapter repo (or the adapter in one of its sub-folders) into a folder."
    )
    pull.add_argument("repo_id", metavar="REPO_ID[@REVISION][:SUBFOLDER]")
    pull.add_argument("--revision", default=None)
    pull.add_argument("--to", required=True)
    pull.add_argument("--overwrite", action="store_true")
    pull.set_defaults(func=_cmd_pull)
    card = sub.add_parser("card", help="Write or refresh an adapter folder's README.md model card.")
    card.add_argument("dir")
    card.add_argument("--repo-id", default=None, help="Repo id the usage snippet should name.")
    card.set_defaults(func=_cmd_card)
    validate = sub.add_parser("validate", help="Check an adapter folder or repo (exit code 0 when valid).")
    validate.add_argument("target", metavar="DIR_OR_REPO[@REVISION][:SUBFOLDER]")
    validate.add_argument("--for", dest="engine", choices=["vllm", "llama.cpp"], default=None)
    validate.add_argument(
        "--base",
        default=None,
        metavar="B",
        help="Also check it fits this base model (Hub id or folder; only its config is read): "
        "target modules present, weight shapes matching.",
    )
    validate.set_defaults(func=_cmd_validate)
    info = sub.add_parser("info", help="Type, base model, parameters, size and files of an adapter.")
    info.add_argument("target", metavar="DIR_OR_REPO[@REVISION][:SUBFOLDER]")
    info.set_defaults(func=_cmd_info)
    convert = sub.add_parser("convert-bin", help="Convert your own trusted adapter_model.bin to safetensors.")
    convert.add_argument("dir")
    convert.set_defaults(func=_cmd_convert_bin)

    from .training.console import add_train_arguments  # the standard library only: the parser stays fast

    train = sub.add_parser("train", help="Train a small LoRA or ReFT adapter from a CSV/JSONL/JSON file of examples.")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)

    merge = sub.add_parser(
        "merge", help="Merge adapters of one base into a new adapter (PEFT's add_weighted_adapter methods)."
    )
    merge.add_argument("adapters", nargs="+", metavar="DIR_OR_REPO[@REVISION][:SUBFOLDER]")
    merge.add_argument("--weights", default=None, help="One per adapter, comma-separated (default: equal).")
    merge.add_argument(
        "--method",
        default="cat",
        choices=LORA_METHODS,
        help="PEFT's combination_type (default cat: exact, rank = the sum of the ranks; IA3: linear, ties, "
        "dare_linear, dare_ties, magnitude_prune).",
    )
    merge.add_argument("--density", type=float, default=None, help="ties/dare/magnitude_prune: share kept (0-1].")
    merge.add_argument("--svd-rank", type=int, default=None, help="The _svd methods' rank (default: the largest).")
    merge.add_argument("--majority-sign-method", choices=["total", "frequency"], default="total")
    merge.add_argument("--seed", type=int, default=0, help="DARE's random drops (default 0: reproducible).")
    merge.add_argument("--out", required=True, metavar="DIR")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--push", default=None, metavar="REPO_ID", help="Also push the merged adapter there.")
    merge.add_argument("--private", action="store_true")
    merge.set_defaults(func=_cmd_merge)

    export = sub.add_parser("export", help="Export a LoRA adapter as a GGUF LoRA for llama.cpp and Ollama.")
    export.add_argument("adapter", metavar="DIR_OR_REPO[@REVISION][:SUBFOLDER]")
    export.add_argument("--to", choices=["gguf"], default="gguf")
    export.add_argument("--out", default=None, metavar="FILE", help="Default: ADAPTER_NAME.gguf here.")
    export.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    export.add_argument("--base", default=None, help="The base model (Hub id or folder; its config only).")
    export.add_argument(
        "--ollama",
        default=None,
        metavar="FROM",
        help="Also write an Ollama Modelfile beside the file: FROM this (the base's GGUF or Ollama model) + ADAPTER.",
    )
    export.add_argument(
        "--base-weights", default=None, metavar="DIR", help="The base's safetensors folder: checks a DoRA is exact."
    )
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=_cmd_export)

    to_lora = sub.add_parser(
        "convert", help="Convert a weight-changing adapter (DoRA, LoHa, LoKr, IA3...) to a plain LoRA by SVD."
    )
    to_lora.add_argument("adapter", metavar="DIR_OR_REPO[@REVISION][:SUBFOLDER]")
    to_lora.add_argument("--to", choices=["lora"], default="lora")
    to_lora.add_argument("--rank", type=int, default=16, help="The LoRA's rank (default 16); higher: smaller error.")
    to_lora.add_argument("--out", required=True, metavar="DIR")
    to_lora.add_argument("--overwrite", action="store_true")
    to_lora.set_defaults(func=_cmd_convert)

    imp = sub.add_parser("import-pyreft", help="Convert a pyreft ReftModel.save directory to hub_peft's format.")
    imp.add_argument("src", metavar="SRC_DIR")
    imp.add_argument("dst", metavar="DST_DIR")
    imp.add_argument("--base", default=None, help="Base model Hub id (pyreft does not record it).")
    imp.add_argument("--positions", default="l1", help="Prompt positions it was trained on (default: l1).")
    imp.add_argument(
        "--prompt-template",
        default=None,
        help="Prompt format it was trained with, with {prompt}; '\\n' is read as a newline.",
    )
    imp.add_argument("--overwrite", action="store_true")
    imp.set_defaults(func=_cmd_import_pyreft)

    studio = sub.add_parser("studio", help="Start the local Hub and the Adapter Studio Space (train, chat, push).")
    studio.add_argument("--port", type=int, default=7860)
    studio.add_argument("--hub-port", type=int, default=None)
    studio.add_argument("--hub-root", default=None)
    studio.add_argument("--user", default="me", help="Local Hub user the Studio pushes as (default: me).")
    studio.add_argument("--no-local-hub", action="store_true", help="Use HF_ENDPOINT/HF_TOKEN as they are.")
    studio.set_defaults(func=_cmd_studio)

    space = sub.add_parser("space", help="The Adapter Studio on a Hugging Face Space.").add_subparsers(
        dest="space_command", required=True
    )
    space_push = space.add_parser("push", help="Create or update a Space with the Studio and a built hub_peft.")
    space_push.add_argument("repo_id", help="namespace/name of the Space")
    space_push.add_argument("--private", action="store_true")
    space_push.add_argument("--hardware", default="cpu-basic", help="Suggested Space hardware (default: cpu-basic).")
    space_push.set_defaults(func=_cmd_space_push)

    from .serving.openai.settings import ServerSettings  # the standard library only

    serve_api = sub.add_parser("serve", help="Serve many adapters over one base model (OpenAI-compatible API).")
    serve_api.add_argument("--base", default=None, help="Base model (default: the embedded SmolLM2-135M-Instruct).")
    serve_api.add_argument("--load-in-4bit", action="store_true", help="Load the base in NF4 4-bit (bitsandbytes).")
    serve_api.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=REPO_ID[@REVISION][:SUBFOLDER]",
        help="An adapter to load at start (repeatable); a folder works too.",
    )
    serve_api.add_argument(
        "--allow-hub-pattern",
        default=None,
        metavar="PATTERN",
        help="Let requests name Hub repos matching this pattern, e.g. 'me/*' (default: off).",
    )
    serve_api.add_argument(
        "--merge-methods",
        type=lambda text: tuple(m for m in text.split(",") if m),
        default=ServerSettings.merge_methods,
        metavar="M1,M2",
        help=f"Methods a request's merge may use (default: {','.join(ServerSettings.merge_methods)}; the svd ones "
        "cost an SVD of every adapted layer; '' turns per-request merges off).",
    )
    serve_api.add_argument(
        "--adapter-dir",
        action="append",
        metavar="FOLDER",
        help="Let the admin route load adapters from folders under FOLDER (repeatable; default: "
        "none: requests name Hub repos only, never local paths).",
    )
    serve_api.add_argument("--host", default="127.0.0.1")
    serve_api.add_argument("--port", type=int, default=8000)
    serve_api.add_argument(
        "--max-running",
        "--max-batch-size",
        type=int,
        default=32,
        help="Sequences decoding at once (cache slots); more requests wait.",
    )
    for flag, help_text in _SERVE_LIMITS:
        default = getattr(ServerSettings, flag[2:].replace("-", "_"))
        serve_api.add_argument(flag, type=type(default), default=default, help=help_text)
    serve_api.add_argument(
        "--memory-budget-mb",
        type=float,
        default=256.0,
        help="Adapter cache budget (MiB); also the most one adapter's weights may take (at least 64 MiB).",
    )
    serve_api.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256.0,
        help="Memory for the keys/values of earlier prompts' blocks, reused by prompts that start the same way "
        "on the same adapters (MiB; 0: off). Each adapter keeps its own blocks: size it for your system prompts "
        "times the adapters that share them (SmolLM2-135M: 0.7 MiB per 16 tokens).",
    )
    serve_api.add_argument(
        "--int8-head",
        action="store_true",
        help="Multiply the LM head through an 8-bit copy of its weight (a quarter of its bytes; logits moved by "
        "the rounding, as llama.cpp's quantizations do). Faster single-stream decode, most on 4-bit bases.",
    )
    body_mb = ServerSettings.max_body_bytes / 2**20
    serve_api.add_argument("--max-body-mb", type=float, default=body_mb, help="Largest request body (MiB); then 413.")
    serve_api.add_argument("--log-level", default="warning")
    serve_api.add_argument(
        "--engine",
        choices=["hub_peft", "vllm"],
        default="hub_peft",
        help="vllm: start vLLM's OpenAI server with these (LoRA) adapters instead; options this "
        "command does not know are passed to vLLM.",
    )
    serve_api.add_argument("--vllm-python", default=sys.executable, help="A Python that has vLLM (default: this one).")
    serve_api.add_argument("--print-command", action="store_true", help="With --engine vllm: print vLLM's command.")
    serve_api.set_defaults(func=_cmd_serve, vllm_args=[])

    demo = sub.add_parser("demo", help="Start the local Hub and chat with the 4-bit default base model.")
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--hub-root", default=None)
    demo.add_argument("--port", type=int, default=None)
    demo.add_argument("--user", default="me")
    demo.add_argument("--exit", action="store_true", help="Stop after the demo instead of keeping the Hub up.")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "engine", None) != "vllm":  # only serve --engine vllm passes options on
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        args.vllm_args = unknown
    try:
        return args.func(args)
    except HubPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
