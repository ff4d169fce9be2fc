"""Adapter Studio: train a small LoRA or ReFT adapter from your examples, chat with it beside the base
model, and push it to the Hub with its model card.

Runs as a Hugging Face Space (real Hub, OAuth login) or locally with ``hub-peft studio`` (embedded
SmolLM2-135M-Instruct, local Hub). The work itself lives in hub_peft (``examples``, ``training``,
``adapters``, ``cards``); this file is the UI and the per-session bookkeeping.
"""

from __future__ import annotations

import copy
import hashlib
import os
import queue
import re
import shutil
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pandas as pd
from huggingface_hub import get_token

from hub_peft.adapters import check_repo_id, push_adapter
from hub_peft.base_model import DEFAULT_BASE, load_base_model
from hub_peft.cards import render_card
from hub_peft.chat import prompt_template
from hub_peft.errors import HubPeftError
from hub_peft.evaluation import Evaluation
from hub_peft.examples import MAX_FILE_BYTES, MAX_ROWS, Table, check_rows, read_table
from hub_peft.presets import held_out_prompts, load_preset
from hub_peft.serving import MultiAdapterModel
from hub_peft.targets import ALL_LINEAR
from hub_peft.training import (
    DEFAULTS,
    Reporter,
    TrainingPlan,
    TrainSettings,
    plan_training,
    token_counter,
)
from hub_peft.training.queue import CANCELLED, FAILED, WAITING, Cores, Job, TrainingQueue
from hub_peft.validate import card_facts

WORK = Path(os.environ.get("HUB_PEFT_STUDIO_DIR") or tempfile.mkdtemp(prefix="adapter_studio_"))
ON_SPACE = bool(os.environ.get("SPACE_ID"))
MAX_NEW_TOKENS = 24
NO_ADAPTER_YET = "(train an adapter in step 2 to see its answer here)"
EMPTY_TABLE = pd.DataFrame({"prompt": [""], "response": [""]})
BEFORE_AFTER_COLUMNS = ["prompt", "reference", "base model", "with the adapter"]


class Models:
    """Base models shared by every session, one instance per role, so that a chat never waits for a
    training: ``"train"`` is used only by the training queue's worker (one job at a time), ``"chat"``
    under :data:`CHAT_LOCK` through the serving engine (:meth:`engine`), and ``"preview"`` is a copy of
    the tokenizer for counting tokens (Rust tokenizers are not shared across threads here)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded: dict[tuple[str, bool, str], tuple[Any, Any]] = {}
        self._engines: dict[tuple[str, bool], MultiAdapterModel] = {}

    def get(self, name: str | None, four_bit: bool, role: str) -> tuple[Any, Any]:
        key = (name or DEFAULT_BASE, bool(four_bit), role)
        with self._lock:  # one load at a time (the first one converts the embedded GGUF)
            if key not in self._loaded:
                if role == "preview":
                    self._loaded[key] = (None, copy.deepcopy(self.get(name, four_bit, "chat")[1]))
                else:
                    self._loaded[key] = load_base_model(key[0], load_in_4bit=key[1])
            return self._loaded[key]

    def engine(self, name: str | None, four_bit: bool) -> MultiAdapterModel:
        """The chat's engine on the ``"chat"`` instance: the serving engine's decode path (fused products, the
        lean step), the base's and the adapter's answers in one batch, every session's adapter in its cache."""
        key = (name or DEFAULT_BASE, bool(four_bit))
        with self._lock:
            if key not in self._engines:
                self._engines[key] = MultiAdapterModel(self.get(name, four_bit, "chat"))
            return self._engines[key]


MODELS = Models()
CHAT_LOCK = threading.Lock()  # one chat at a time on the chat instance (a few seconds each)
PREVIEW_LOCK = threading.Lock()
CORES = Cores()  # a chat next to a training: one core each on two, never both on every core
QUEUE = TrainingQueue()


def _user(request: gr.Request | None) -> str:
    """Who a training belongs to: the signed-in Hub user on a Space, else the browser session."""
    return getattr(request, "username", None) or getattr(request, "session_hash", None) or "local"


def _count_tokens(base_name: str | None, four_bit: bool):
    _, tokenizer = MODELS.get(base_name, four_bit, "preview")
    count = token_counter(tokenizer, prompt_template(tokenizer))

    def locked(row: dict[str, str]) -> int:
        with PREVIEW_LOCK:
            return count(row)

    return locked


def _table_from(rows: list[dict[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows or [{"prompt": "", "response": ""}], columns=["prompt", "response"])


def _rows_from(table: pd.DataFrame | None) -> list[dict[str, str]]:
    if table is None or len(table) == 0:
        return []
    frame = pd.DataFrame(table)
    if not {"prompt", "response"} <= set(frame.columns):
        raise gr.Error("The table needs a 'prompt' and a 'response' column.")
    return [
        {"prompt": str(p or ""), "response": str(r or "")}
        for p, r in zip(frame["prompt"], frame["response"], strict=True)
    ]


# --- 1. examples ---------------------------------------------------------------------------------


def _read_upload(path: str) -> tuple[Path, Table]:
    """An uploaded file, size-checked and parsed (CSV, JSONL or JSON); problems as a ``gr.Error``."""
    file = Path(path)
    if file.stat().st_size > MAX_FILE_BYTES:
        raise gr.Error(
            f"{file.name} is {file.stat().st_size / 2**20:.1f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB."
        )
    try:
        return file, read_table(file.read_bytes(), file.name)
    except HubPeftError as e:
        raise gr.Error(str(e)) from None


def on_upload(path: str | None):
    """Read an uploaded file; if its columns are not obviously prompt/response, ask for a mapping."""
    hidden = gr.update(visible=False)
    if not path:
        return gr.update(), hidden, hidden, None, "Upload a CSV, JSONL or JSON file, or load the preset."
    file, table = _read_upload(path)
    prompt_col, response_col = table.guess_mapping()
    if prompt_col and response_col:
        rows = table.rows(prompt_col, response_col)
        return _table_from(rows), hidden, hidden, None, f"Loaded {len(rows)} rows from {file.name}."
    choices = gr.update(choices=table.columns, value=None, visible=True)
    note = f"{file.name} has columns {table.columns}: pick the prompt and response columns."
    pending = {"records": table.records, "columns": table.columns, "source": file.name}
    return gr.update(), choices, choices, pending, note


def on_mapping(prompt_col: str | None, response_col: str | None, pending: dict | None):
    if not pending or not prompt_col or not response_col:
        return gr.update(), "Pick both columns."
    try:
        rows = Table(pending["records"], pending["columns"], pending["source"]).rows(prompt_col, response_col)
    except HubPeftError as e:
        raise gr.Error(str(e)) from None
    return _table_from(rows), f"Loaded {len(rows)} rows from {pending['source']} ({prompt_col} → {response_col})."


def preview(table: pd.DataFrame, base_name: str, four_bit: bool) -> str:
    """What will be trained: count, tokens, problems."""
    rows = _rows_from(table)
    if not any(r["prompt"].strip() or r["response"].strip() for r in rows):
        return "No examples yet: upload a file, paste rows into the table, or load the emoji preset."
    try:
        result = check_rows(rows, count_tokens=_count_tokens(base_name, four_bit))
    except HubPeftError as e:
        return f"**Problem:** {e}"
    lines = [f"**{result.summary()}**"]
    lines += [f"- {'⛔' if p.blocking else '⚠️'} {p.message}" for p in result.problems[:20]]
    if len(result.problems) > 20:
        lines.append(f"- … and {len(result.problems) - 20} more")
    return "\n".join(lines)


# --- 2. training ---------------------------------------------------------------------------------


def _settings(method, base_name, four_bit, rank, layers, positions, lr, epochs, target_modules=None) -> TrainSettings:
    method = "reft" if str(method).lower().startswith("reft") else "lora"
    targets = (str(target_modules or "").strip() or None) if method == "lora" else None  # LoRA only
    try:
        parsed_layers = [int(x) for x in str(layers).replace(" ", "").split(",") if x] if layers else None
    except ValueError:
        raise gr.Error(f"Layers must be comma-separated numbers like 8,16, got {layers!r}.") from None
    try:
        return TrainSettings(
            method=method,
            base=base_name or None,
            load_in_4bit=bool(four_bit),
            rank=int(rank) if rank else None,
            lr=float(lr) if lr else None,
            epochs=int(epochs) if epochs else None,
            layers=parsed_layers,
            positions=positions or "l1",
            target_modules=targets,
        )
    except HubPeftError as e:
        raise gr.Error(str(e)) from None


def on_validation_upload(path: str | None) -> tuple[list[dict[str, str]], str]:
    """Held-out rows from a second upload (prompt/response columns); none clears them."""
    if not path:
        return [], "No validation file: with 20 or more examples, 10% of them are held out."
    file, table = _read_upload(path)
    prompt_col, response_col = table.guess_mapping()
    if not (prompt_col and response_col):
        raise gr.Error(f"{file.name} needs prompt and response columns, it has {table.columns}.")
    try:
        rows = check_rows(table.rows(prompt_col, response_col)).rows
    except HubPeftError as e:
        raise gr.Error(str(e)) from None
    return rows, f"Validation: {len(rows)} rows from {file.name}, never trained on."


def _curve(history: list[dict]) -> pd.DataFrame:
    """Train and validation loss in one long table, for one LinePlot with a line per series."""
    points = [{"step": h["step"], "loss": h["loss"], "series": "train"} for h in history]
    points += [{"step": h["step"], "loss": h["val_loss"], "series": "validation"} for h in history if "val_loss" in h]
    return pd.DataFrame(points, columns=["step", "loss", "series"])


def _before_after(evaluation: Evaluation | None) -> pd.DataFrame:
    rows = [[c.prompt, c.reference or "—", c.base, c.adapter] for c in (evaluation.comparisons if evaluation else [])]
    return pd.DataFrame(rows or [["", "", "", ""]], columns=BEFORE_AFTER_COLUMNS)


class _JobReport(Reporter):
    """A queued training's progress goes to its job (and so to its page); the job's Cancel stops it."""

    def __init__(self, job: Job, share) -> None:
        self.job, self.share = job, share

    def step(self, entry: dict) -> None:
        self.share()  # fewer threads while someone chats
        self.job.report(entry)

    def should_stop(self) -> bool:
        return self.job.cancelled.is_set()


def _training_job(plan: TrainingPlan, folder: Path, prompts: list[str] | None):
    """The work of one queued training, run by the queue's worker on the "train" model instance."""

    def run(job: Job) -> tuple[Any, Evaluation | None]:
        with CORES.train() as share:
            base = MODELS.get(plan.settings.base, plan.settings.load_in_4bit, "train")
            done = plan.run(
                base,
                folder,
                reporter=_JobReport(job, share),
                prompts=prompts,
                overwrite=True,
                dataset_name="adapter-studio-examples",
                release=True,  # the "train" base model is shared by every session's training
            )
        return done.trained, done.evaluation

    return run


def _plan(table, validation_rows, settings: TrainSettings) -> TrainingPlan:
    """The rows checked and split when the training is queued: bad rows are refused at once, not in turn."""
    rows, held_out = _rows_from(table), list(validation_rows or []) or None
    count_tokens = _count_tokens(settings.base, settings.load_in_4bit)
    try:
        return plan_training(rows, settings, count_tokens=count_tokens, validation_rows=held_out)
    except HubPeftError as e:
        raise gr.Error(str(e)) from None


def _waiting_status(job: Job) -> str:
    position, eta = QUEUE.position(job), QUEUE.eta(job)
    when = f"starts in about {eta:.0f} s" if eta is not None else "starts when the running training ends"
    return f"Queued: position {position} in the training queue; {when}. Cancel leaves the queue."


def train(
    table,
    validation_rows,
    method,
    base_name,
    four_bit,
    rank,
    layers,
    positions,
    lr,
    epochs,
    state,
    target_modules=ALL_LINEAR,
    request: gr.Request = None,
    progress=gr.Progress(),  # noqa: B008 - Gradio's way
):
    """Queue a training (one per user, run in arrival order) and stream its place in the queue, then
    its progress, the train/validation loss curve, elapsed time and ETA."""
    user = _user(request)
    settings = _settings(method, base_name, four_bit, rank, layers, positions, lr, epochs, target_modules)
    plan = _plan(table, validation_rows, settings)
    preset = not plan.held_out and plan.preview.rows == [dict(r) for r in load_preset()]
    prompts = held_out_prompts() if preset else None  # the preset has no validation rows: show other prompts
    folder = WORK / re.sub(r"[^A-Za-z0-9_-]", "_", user) / "adapter"
    try:
        job = QUEUE.submit(user, _training_job(plan, folder, prompts), plan.planned_steps)
    except HubPeftError as e:
        raise gr.Error(str(e)) from None
    try:
        yield from _progress_updates(job, settings.method, plan.planned_steps, state, progress)
    except BaseException:  # the page went away: leave the queue, or stop after the current step
        QUEUE.cancel(user)
        raise
    yield _outcome(job, settings, folder, state)


def _progress_updates(job: Job, method: str, total: int, state, progress):
    """The job's place in the queue while it waits, then each step's loss (and validation loss) and ETA."""
    keep = gr.update()
    history: list[dict] = []
    shown = None
    while True:
        try:
            entry = job.updates.get(timeout=0.5)
        except queue.Empty:
            entry = {}
        if entry is None:
            return
        if not entry:  # no new step: show the place in the queue, or that it has started
            if history:
                continue
            started = f"Training {method.upper()}: starting…"
            status = _waiting_status(job) if job.state == WAITING else started
            if status != shown:
                progress(0, desc=status)
                yield status, keep, state, keep, keep, keep
                shown = status
            continue
        history.append(entry)
        eta = QUEUE.eta(job)
        progress((entry["step"], total), desc=f"step {entry['step']}/{total}, loss {entry['loss']:.3f}")
        shown = (
            f"Training {method.upper()}: step {entry['step']}/{total}, loss {entry['loss']:.3f}"
            + (f", validation loss {entry['val_loss']:.3f}" if "val_loss" in entry else "")
            + (f", about {eta:.0f} s left" if eta is not None else "")
        )
        yield shown, _curve(history), state, keep, keep, keep


def _outcome(job: Job, settings: TrainSettings, folder: Path, state):
    """The last update of a finished job: its status line, curve, session state, card, zip and before/after."""
    keep = gr.update()
    if job.state == FAILED:
        error = job.error
        raise gr.Error(str(error) if isinstance(error, HubPeftError) else f"Training failed: {error!r}")
    if job.result is None:
        return "Cancelled before it started.", keep, state, keep, keep, keep
    trained, evaluation = job.result
    result = trained.result
    verb = "Cancelled" if result.stopped == "cancelled" else "Done"
    status = f"{verb}."
    if result.history:
        first, last = result.history[0]["loss"], result.history[-1]["loss"]
        status = f"{verb}: {result.steps} steps in {result.seconds:.1f} s, loss {first:.3f} → {last:.3f}"
    if evaluation and evaluation.metrics:
        status += "; " + ", ".join(f"{k} {v}" for k, v in sorted(evaluation.metrics.items()))
    state = {**(state or {}), "adapter": str(folder), "base": settings.base or DEFAULT_BASE}
    state.update(four_bit=settings.load_in_4bit, method=settings.method)
    card = card_preview(render_card(folder, **card_facts(folder)))
    return status, _curve(result.history), state, card, _zip(folder), _before_after(evaluation)


def card_preview(card: str) -> str:
    """The card as the Hub shows it: metadata as a YAML block, then the body (the loss curve is the plot above)."""
    _, metadata, body = card.split("---\n", 2)
    body = body.replace(
        "![Training loss](loss_curve.png)", "*(loss curve: the plot above, pushed as `loss_curve.png`)*"
    )
    return f"```yaml\n{metadata}```\n{body}"


def cancel_training(request: gr.Request) -> str:
    job = QUEUE.cancel(_user(request))
    if job is None:
        return "You have no training in the queue."
    return "Left the queue." if job.state == CANCELLED else "Cancelling after the current step…"


def _zip(folder: Path) -> str:
    return shutil.make_archive(str(folder.parent / "adapter"), "zip", folder)


# --- 3. chat -------------------------------------------------------------------------------------


def chat(prompt: str, state: dict | None) -> tuple[str, str]:
    """The base model's answer and, once this session has trained one, the adapter's. Runs on the chat
    model instance, so it never waits for a training, on its share of the cores."""
    if not prompt or not prompt.strip():
        raise gr.Error("Type a prompt first.")
    state = state or {}
    with CHAT_LOCK, CORES.chat():
        engine = MODELS.engine(state.get("base"), state.get("four_bit", False))
        if "adapter" not in state:
            return engine.generate([prompt], max_new_tokens=MAX_NEW_TOKENS)[0], NO_ADAPTER_YET
        name = _chat_name(engine, Path(state["adapter"]))
        plain, tuned = engine.generate([prompt, prompt], [None, name], max_new_tokens=MAX_NEW_TOKENS)
    return plain, tuned


_CHAT_NAMES: dict[tuple[int, Path], str] = {}  # (engine, adapter folder) -> the name its files are loaded under


def _chat_name(engine: MultiAdapterModel, folder: Path) -> str:
    """The engine's name for the adapter now in ``folder`` (a session's folder is reused when it trains again:
    the name follows the files, and the previous one is removed). Called under :data:`CHAT_LOCK`."""
    digest = hashlib.sha256(str(folder).encode())
    for file in sorted(f for f in folder.iterdir() if f.is_file()):  # a Studio adapter: a few MB
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    name = "session-" + digest.hexdigest()[:16]
    previous = _CHAT_NAMES.get((id(engine), folder))
    if previous != name:
        engine.add(name, folder)
        if previous is not None:
            engine.remove(previous)
        _CHAT_NAMES[(id(engine), folder)] = name
    return name


# --- 4. share ------------------------------------------------------------------------------------


def push(repo_id: str, private: bool, token: str, state: dict | None, oauth_token: gr.OAuthToken | None = None) -> str:
    if not state or "adapter" not in state:
        raise gr.Error("Train an adapter first (step 2).")
    try:
        check_repo_id((repo_id or "").strip())
        token = (token or "").strip() or (oauth_token.token if oauth_token else None) or None
        if token is None and get_token() is None:  # no login, no typed token, no HF_TOKEN
            raise gr.Error(
                "Sign in with Hugging Face (the button above) or paste a write token to push."
                if ON_SPACE
                else "Paste a write token (or set HF_TOKEN) to push."
            )
        url = push_adapter(state["adapter"], repo_id.strip(), private=bool(private), token=token)
    except HubPeftError as e:
        raise gr.Error(str(e)) from None
    from huggingface_hub import constants

    return f"Pushed: [{repo_id}]({constants.ENDPOINT}/{repo_id.strip()}) (commit: {url})"


# --- layout --------------------------------------------------------------------------------------


def _examples_section(ui: SimpleNamespace) -> None:
    with gr.Group():
        gr.Markdown("## 1. Examples")
        with gr.Row():
            ui.upload = gr.File(
                label="CSV, JSONL or JSON (prompt/response)", file_types=[".csv", ".jsonl", ".json"], elem_id="upload"
            )
            with gr.Column():
                ui.preset = gr.Button("Load the emoji preset", elem_id="preset")
                ui.load_note = gr.Markdown()
        with gr.Row():
            ui.prompt_col = gr.Dropdown(label="Prompt column", visible=False)
            ui.response_col = gr.Dropdown(label="Response column", visible=False)
        ui.table = gr.Dataframe(
            value=EMPTY_TABLE,
            headers=["prompt", "response"],
            column_count=(2, "fixed"),
            interactive=True,
            wrap=True,
            label="Examples (editable)",
            elem_id="examples",
        )
        ui.summary = gr.Markdown(elem_id="preview")
        with gr.Row():
            ui.validation_upload = gr.File(
                label="Validation rows (optional; else 10% held out at 20+ examples)",
                file_types=[".csv", ".jsonl", ".json"],
                elem_id="validation-upload",
            )
            ui.validation_note = gr.Markdown(elem_id="validation-note")


def _settings_inputs(ui: SimpleNamespace) -> None:
    reft, lora = DEFAULTS["reft"], DEFAULTS["lora"]
    with gr.Row():
        ui.base_name = gr.Dropdown([DEFAULT_BASE], value=DEFAULT_BASE, allow_custom_value=True, label="Base model")
        ui.four_bit = gr.Checkbox(False, label="Load in 4-bit (NF4)")
        ui.method = gr.Radio(["ReFT", "LoRA"], value="ReFT", label="Method")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            ui.rank = gr.Number(None, label=f"Rank (default ReFT {reft['rank']}, LoRA {lora['rank']})", precision=0)
            ui.epochs = gr.Number(
                None,
                label=f"Epochs (default ReFT {reft['epochs']}, LoRA {lora['epochs']})",
                precision=0,
                elem_id="epochs",
            )
            ui.lr = gr.Number(None, label=f"Learning rate (default {reft['lr']})")
        with gr.Row():
            ui.layers = gr.Textbox("", label="ReFT layers (default: 8,16 on a 30-layer model)")
            ui.positions = gr.Textbox("l1", label="ReFT positions (l1 = last prompt token, f1+l1, ...)")
            ui.target_modules = gr.Textbox(
                ALL_LINEAR,
                elem_id="target-modules",
                label="LoRA target modules (all-linear, peft-default, or names such as q_proj,v_proj)",
            )


def _train_section(ui: SimpleNamespace) -> None:
    with gr.Group():
        gr.Markdown("## 2. Train")
        _settings_inputs(ui)
        with gr.Row():
            ui.train_button = gr.Button("Train", variant="primary", elem_id="train")
            ui.cancel_button = gr.Button("Cancel", elem_id="cancel")
        ui.status = gr.Markdown(elem_id="status")
        ui.curve = gr.LinePlot(
            x="step", y="loss", color="series", title="Training and validation loss", height=260, elem_id="loss-curve"
        )
        gr.Markdown(
            "**Before / after**: the base model and your adapter on prompts it was not trained on "
            "(the validation rows, or the preset's held-out prompts), greedy decoding."
        )
        ui.before_after = gr.Dataframe(
            value=_before_after(None),
            headers=BEFORE_AFTER_COLUMNS,
            interactive=False,
            wrap=True,
            column_widths=["22%", "14%", "32%", "32%"],
            elem_id="before-after",
        )


def _chat_and_share_sections(ui: SimpleNamespace) -> None:
    with gr.Group():
        gr.Markdown("## 3. Chat: base model vs your adapter")
        ui.prompt = gr.Textbox(label="Prompt", value=held_out_prompts()[0], elem_id="prompt")
        gr.Examples(held_out_prompts(), inputs=ui.prompt, label="Prompts not in the preset")
        ui.ask = gr.Button("Ask both", elem_id="ask")
        with gr.Row():
            ui.plain_answer = gr.Textbox(label="Base model", elem_id="base-answer", interactive=False)
            ui.tuned_answer = gr.Textbox(label="With the adapter", elem_id="adapter-answer", interactive=False)
    with gr.Group():
        gr.Markdown("## 4. Share")
        with gr.Row():
            ui.repo_id = gr.Textbox(label="Repo id (namespace/name)", placeholder="me/emoji-adapter", elem_id="repo")
            ui.private = gr.Checkbox(False, label="Private")
            ui.token = gr.Textbox(label="Write token (empty: your login or HF_TOKEN)", type="password")
        if ON_SPACE:
            gr.LoginButton()
        with gr.Row():
            ui.push_button = gr.Button("Push to the Hub", variant="primary", elem_id="push")
            ui.download = gr.DownloadButton("Download the adapter (.zip)", elem_id="download")
        ui.pushed = gr.Markdown(elem_id="pushed")
        with gr.Accordion("Model card preview", open=True):
            ui.card = gr.Markdown(elem_id="card")


def _wire(ui: SimpleNamespace) -> None:
    preview_inputs = [ui.table, ui.base_name, ui.four_bit]
    ui.upload.upload(on_upload, ui.upload, [ui.table, ui.prompt_col, ui.response_col, ui.pending, ui.load_note]).then(
        preview, preview_inputs, ui.summary
    )
    for dropdown in (ui.prompt_col, ui.response_col):
        dropdown.change(on_mapping, [ui.prompt_col, ui.response_col, ui.pending], [ui.table, ui.load_note]).then(
            preview, preview_inputs, ui.summary
        )
    ui.preset.click(
        lambda: (_table_from(load_preset()), "Loaded the emoji preset (10 rows)."), None, [ui.table, ui.load_note]
    ).then(preview, preview_inputs, ui.summary)
    ui.table.input(preview, preview_inputs, ui.summary)
    ui.validation_upload.change(on_validation_upload, ui.validation_upload, [ui.validation_rows, ui.validation_note])
    settings = [ui.method, ui.base_name, ui.four_bit, ui.rank, ui.layers, ui.positions, ui.lr, ui.epochs]
    # Many handlers may wait at once: the training queue, not Gradio's, runs them one at a time and shows
    # each its position.
    ui.train_button.click(
        train,
        [ui.table, ui.validation_rows, *settings, ui.state, ui.target_modules],  # train()'s parameters, in order
        [ui.status, ui.curve, ui.state, ui.card, ui.download, ui.before_after],
        concurrency_limit=16,
        concurrency_id="train",
    )
    ui.cancel_button.click(cancel_training, None, ui.status, queue=False)
    ui.ask.click(chat, [ui.prompt, ui.state], [ui.plain_answer, ui.tuned_answer], concurrency_limit=4)
    ui.push_button.click(push, [ui.repo_id, ui.private, ui.token, ui.state], ui.pushed)


def build() -> gr.Blocks:
    with gr.Blocks(title="Adapter Studio") as demo:
        ui = SimpleNamespace(state=gr.State({}), pending=gr.State(None), validation_rows=gr.State([]))
        gr.Markdown(
            "# 🧪 Adapter Studio\nTrain a small **ReFT** or **LoRA** adapter from a few examples, chat with it next to "
            f"the base model, and push it to the Hub with a generated model card. Default base: `{DEFAULT_BASE}`."
        )
        _examples_section(ui)
        _train_section(ui)
        _chat_and_share_sections(ui)
        _wire(ui)
    return demo


def main() -> None:
    build().queue(default_concurrency_limit=2, max_size=32).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if ON_SPACE else "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=MAX_FILE_BYTES,
        show_error=True,
    )


if __name__ == "__main__":
    main()

__all__ = ["MAX_ROWS", "build", "chat", "main", "on_mapping", "on_upload", "preview", "push", "train"]
