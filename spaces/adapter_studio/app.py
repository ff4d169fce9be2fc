"""Adapter Studio: train a small LoRA or ReFT adapter from your examples, chat with it beside the base
model, and push it to the Hub with its model card.

Runs as a Hugging Face Space (real Hub, OAuth login) or locally with ``hub-peft studio`` (embedded
SmolLM2-135M-Instruct, local Hub). The work itself lives in hub_peft (``examples``, ``training``,
``adapters``, ``cards``); this file is the UI and the per-session bookkeeping.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from huggingface_hub import get_token

from hub_peft.adapters import check_repo_id, load_adapter, push_adapter
from hub_peft.base_model import DEFAULT_BASE, load_base_model
from hub_peft.cards import render_card
from hub_peft.chat import generate_reply, prompt_template
from hub_peft.errors import HubPeftError
from hub_peft.examples import MAX_FILE_BYTES, MAX_ROWS, Table, check_rows, read_table
from hub_peft.presets import held_out_prompts, load_preset
from hub_peft.training import (
    DEFAULTS,
    TrainSettings,
    detach_adapter,
    planned_steps,
    save_trained,
    token_counter,
    train_adapter,
)

WORK = Path(os.environ.get("HUB_PEFT_STUDIO_DIR") or tempfile.mkdtemp(prefix="adapter_studio_"))
ON_SPACE = bool(os.environ.get("SPACE_ID"))
MAX_NEW_TOKENS = 24
EMPTY_TABLE = pd.DataFrame({"prompt": [""], "response": [""]})


class Models:
    """Base models shared by every session. One lock: adapters attach to the shared base while a
    request runs (ReFT hooks, LoRA layers) and are detached before the next one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._loaded: dict[tuple[str, bool], tuple[Any, Any]] = {}

    def get(self, name: str, four_bit: bool) -> tuple[Any, Any]:
        key = (name or DEFAULT_BASE, bool(four_bit))
        if key not in self._loaded:
            self._loaded[key] = load_base_model(key[0], load_in_4bit=key[1])
        return self._loaded[key]


MODELS = Models()
CANCEL: dict[str, threading.Event] = {}  # session -> cancel flag of its running training


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


def on_upload(path: str | None):
    """Read an uploaded file; if its columns are not obviously prompt/response, ask for a mapping."""
    hidden = gr.update(visible=False)
    if not path:
        return gr.update(), hidden, hidden, None, "Upload a CSV, JSONL or JSON file, or load the preset."
    file = Path(path)
    if file.stat().st_size > MAX_FILE_BYTES:
        raise gr.Error(
            f"{file.name} is {file.stat().st_size / 2**20:.1f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB."
        )
    try:
        table = read_table(file.read_bytes(), file.name)
    except HubPeftError as e:
        raise gr.Error(str(e)) from None
    prompt_col, response_col = table.guess_mapping()
    if prompt_col and response_col:
        rows = table.rows(prompt_col, response_col)
        return _table_from(rows), hidden, hidden, None, f"Loaded {len(rows)} rows from {file.name}."
    choices = gr.update(choices=table.columns, value=None, visible=True)
    note = f"{file.name} has columns {table.columns}: pick the prompt and response columns."
    return (
        gr.update(),
        choices,
        choices,
        {"records": table.records, "columns": table.columns, "source": file.name},
        note,
    )


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
        _, tokenizer = MODELS.get(base_name, four_bit)
        result = check_rows(rows, count_tokens=token_counter(tokenizer, prompt_template(tokenizer)))
    except HubPeftError as e:
        return f"**Problem:** {e}"
    lines = [f"**{result.summary()}**"]
    lines += [f"- {'⛔' if p.blocking else '⚠️'} {p.message}" for p in result.problems[:20]]
    if len(result.problems) > 20:
        lines.append(f"- … and {len(result.problems) - 20} more")
    return "\n".join(lines)


# --- 2. training ---------------------------------------------------------------------------------


def _settings(method, base_name, four_bit, rank, layers, positions, lr, epochs) -> TrainSettings:
    method = "reft" if str(method).lower().startswith("reft") else "lora"
    try:
        parsed_layers = [int(x) for x in str(layers).replace(" ", "").split(",") if x] if layers else None
    except ValueError:
        raise gr.Error(f"Layers must be comma-separated numbers like 8,16, got {layers!r}.") from None
    try:
        return TrainSettings(method=method, base=base_name or None, load_in_4bit=bool(four_bit),
                             rank=int(rank) if rank else None, lr=float(lr) if lr else None,
                             epochs=int(epochs) if epochs else None, layers=parsed_layers,
                             positions=positions or "l1")  # fmt: skip
    except HubPeftError as e:
        raise gr.Error(str(e)) from None


def train(table, method, base_name, four_bit, rank, layers, positions, lr, epochs, state,
          request: gr.Request, progress=gr.Progress()):  # noqa: B008 - Gradio's way  # fmt: skip
    """Train in a worker thread and stream progress, the loss curve, elapsed time and ETA."""
    session = request.session_hash or "local"
    if session in CANCEL:
        raise gr.Error("A training is already running in this session.")
    settings = _settings(method, base_name, four_bit, rank, layers, positions, lr, epochs)
    rows = _rows_from(table)
    cancel = threading.Event()
    CANCEL[session] = cancel
    try:
        progress(0, desc="Waiting for the model…")
        with MODELS.lock:
            model, tokenizer = MODELS.get(settings.base, settings.load_in_4bit)
            checked = check_rows(rows, count_tokens=token_counter(tokenizer, prompt_template(tokenizer)))
            if not checked.ok:
                raise gr.Error(checked.summary() + " " + "; ".join(p.message for p in checked.problems if p.blocking))
            from hub_peft.reft.model import find_decoder_layers

            resolved = settings.resolved(len(find_decoder_layers(model)))
            total = planned_steps(len(checked.rows), resolved)
            updates: queue.Queue = queue.Queue()
            outcome: dict[str, Any] = {}

            def work() -> None:
                try:
                    outcome["trained"] = train_adapter(checked.rows, settings, base=(model, tokenizer),
                                                       on_step=updates.put, should_stop=cancel.is_set)  # fmt: skip
                except BaseException as e:  # reported in the UI below
                    outcome["error"] = e
                finally:
                    updates.put(None)

            started = time.perf_counter()
            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            history: list[dict] = []
            try:
                entries = iter(updates.get, None)
                entry = next(entries, None)
            except BaseException:
                cancel.set()
                worker.join()
                raise
            while entry is not None:
                history.append(entry)
                elapsed = time.perf_counter() - started
                eta = elapsed / entry["step"] * (total - entry["step"])
                progress((entry["step"], total), desc=f"step {entry['step']}/{total}, loss {entry['loss']:.3f}")
                status = (f"Training {resolved.method.upper()}: step {entry['step']}/{total}, "
                          f"loss {entry['loss']:.3f}, {elapsed:.0f} s elapsed, about {eta:.0f} s left")  # fmt: skip
                try:
                    yield status, pd.DataFrame(history)[["step", "loss"]], state, gr.update(), gr.update()
                    entry = next(entries, None)
                except BaseException:  # the page went away: stop training before freeing the shared model
                    cancel.set()
                    worker.join()
                    raise
            worker.join()
            if "error" in outcome:
                error = outcome["error"]
                raise gr.Error(str(error) if isinstance(error, HubPeftError) else f"Training failed: {error!r}")
            trained = outcome["trained"]
            folder = WORK / session / "adapter"
            try:
                save_trained(trained, folder, overwrite=True, dataset_name="adapter-studio-examples")
            finally:
                trained.release()
    finally:
        CANCEL.pop(session, None)
    result = trained.result
    verb = "Cancelled" if result.stopped == "cancelled" else "Done"
    status = f"{verb}."
    if result.history:
        first, last = result.history[0]["loss"], result.history[-1]["loss"]
        status = f"{verb}: {result.steps} steps in {result.seconds:.1f} s, loss {first:.3f} → {last:.3f}"
    state = {**(state or {}), "adapter": str(folder), "base": settings.base or DEFAULT_BASE,
             "four_bit": settings.load_in_4bit, "method": resolved.method}  # fmt: skip
    card = card_preview(render_card(folder))
    yield status, pd.DataFrame(history)[["step", "loss"]] if history else None, state, card, _zip(folder)


def card_preview(card: str) -> str:
    """The card as the Hub shows it: metadata as a YAML block, then the body (the loss curve is the plot above)."""
    _, metadata, body = card.split("---\n", 2)
    body = body.replace(
        "![Training loss](loss_curve.png)", "*(loss curve: the plot above, pushed as `loss_curve.png`)*"
    )
    return f"```yaml\n{metadata}```\n{body}"


def cancel_training(request: gr.Request) -> str:
    event = CANCEL.get(request.session_hash or "local")
    if event is None:
        return "Nothing is training in this session."
    event.set()
    return "Cancelling after the current step…"


def _zip(folder: Path) -> str:
    archive = shutil.make_archive(str(folder.parent / "adapter"), "zip", folder)
    return archive


# --- 3. chat -------------------------------------------------------------------------------------


def chat(prompt: str, state: dict | None) -> tuple[str, str]:
    if not prompt or not prompt.strip():
        raise gr.Error("Type a prompt first.")
    if not state or "adapter" not in state:
        raise gr.Error("Train an adapter first (step 2).")
    with MODELS.lock:
        model, tokenizer = MODELS.get(state["base"], state["four_bit"])
        plain = generate_reply(model, tokenizer, prompt, max_new_tokens=MAX_NEW_TOKENS)
        adapted = load_adapter(model, state["adapter"])
        try:
            tuned = generate_reply(adapted, tokenizer, prompt, max_new_tokens=MAX_NEW_TOKENS)
        finally:
            detach_adapter(adapted)
    return plain, tuned


# --- 4. share ------------------------------------------------------------------------------------


def push(repo_id: str, private: bool, token: str, state: dict | None, oauth_token: gr.OAuthToken | None = None) -> str:
    if not state or "adapter" not in state:
        raise gr.Error("Train an adapter first (step 2).")
    try:
        check_repo_id((repo_id or "").strip())
        token = (token or "").strip() or (oauth_token.token if oauth_token else None) or None
        if token is None and get_token() is None:  # no login, no typed token, no HF_TOKEN
            raise gr.Error("Sign in with Hugging Face (the button above) or paste a write token to push."
                           if ON_SPACE else "Paste a write token (or set HF_TOKEN) to push.")  # fmt: skip
        url = push_adapter(state["adapter"], repo_id.strip(), private=bool(private), token=token)
    except HubPeftError as e:
        raise gr.Error(str(e)) from None
    from huggingface_hub import constants

    return f"Pushed: [{repo_id}]({constants.ENDPOINT}/{repo_id.strip()}) (commit: {url})"


# --- layout --------------------------------------------------------------------------------------


def build() -> gr.Blocks:
    reft, lora = DEFAULTS["reft"], DEFAULTS["lora"]
    with gr.Blocks(title="Adapter Studio") as demo:
        state = gr.State({})
        pending = gr.State(None)
        gr.Markdown(
            "# 🧪 Adapter Studio\nTrain a small **ReFT** or **LoRA** adapter from a few examples, chat with it next to "
            f"the base model, and push it to the Hub with a generated model card. Default base: `{DEFAULT_BASE}`."
        )
        with gr.Group():
            gr.Markdown("## 1. Examples")
            with gr.Row():
                upload = gr.File(label="CSV, JSONL or JSON (prompt/response)", file_types=[".csv", ".jsonl", ".json"],
                                 elem_id="upload")  # fmt: skip
                with gr.Column():
                    preset = gr.Button("Load the emoji preset", elem_id="preset")
                    load_note = gr.Markdown()
            with gr.Row():
                prompt_col = gr.Dropdown(label="Prompt column", visible=False)
                response_col = gr.Dropdown(label="Response column", visible=False)
            table = gr.Dataframe(value=EMPTY_TABLE, headers=["prompt", "response"], column_count=(2, "fixed"),
                                 interactive=True, wrap=True, label="Examples (editable)",
                                 elem_id="examples")  # fmt: skip
            summary = gr.Markdown(elem_id="preview")
        with gr.Group():
            gr.Markdown("## 2. Train")
            with gr.Row():
                base_name = gr.Dropdown([DEFAULT_BASE], value=DEFAULT_BASE, allow_custom_value=True, label="Base model")
                four_bit = gr.Checkbox(False, label="Load in 4-bit (NF4)")
                method = gr.Radio(["ReFT", "LoRA"], value="ReFT", label="Method")
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    rank = gr.Number(
                        None, label=f"Rank (default ReFT {reft['rank']}, LoRA {lora['rank']})", precision=0
                    )
                    epochs = gr.Number(None, label=f"Epochs (default ReFT {reft['epochs']}, LoRA {lora['epochs']})",
                                       precision=0)  # fmt: skip
                    lr = gr.Number(None, label=f"Learning rate (default {reft['lr']})")
                with gr.Row():
                    layers = gr.Textbox("", label="ReFT layers (default: 8,16 on a 30-layer model)")
                    positions = gr.Textbox("l1", label="ReFT positions (l1 = last prompt token, f1+l1, ...)")
            with gr.Row():
                train_button = gr.Button("Train", variant="primary", elem_id="train")
                cancel_button = gr.Button("Cancel", elem_id="cancel")
            status = gr.Markdown(elem_id="status")
            curve = gr.LinePlot(x="step", y="loss", title="Training loss", height=260, elem_id="loss-curve")
        with gr.Group():
            gr.Markdown("## 3. Chat: base model vs your adapter")
            prompt = gr.Textbox(label="Prompt", value=held_out_prompts()[0], elem_id="prompt")
            gr.Examples(held_out_prompts(), inputs=prompt, label="Prompts not in the preset")
            ask = gr.Button("Ask both", elem_id="ask")
            with gr.Row():
                plain_answer = gr.Textbox(label="Base model", elem_id="base-answer", interactive=False)
                tuned_answer = gr.Textbox(label="With the adapter", elem_id="adapter-answer", interactive=False)
        with gr.Group():
            gr.Markdown("## 4. Share")
            with gr.Row():
                repo_id = gr.Textbox(label="Repo id (namespace/name)", placeholder="me/emoji-adapter", elem_id="repo")
                private = gr.Checkbox(False, label="Private")
                token = gr.Textbox(label="Write token (empty: your login or HF_TOKEN)", type="password")
            if ON_SPACE:
                gr.LoginButton()
            with gr.Row():
                push_button = gr.Button("Push to the Hub", variant="primary", elem_id="push")
                download = gr.DownloadButton("Download the adapter (.zip)", elem_id="download")
            pushed = gr.Markdown(elem_id="pushed")
            with gr.Accordion("Model card preview", open=True):
                card = gr.Markdown(elem_id="card")

        preview_inputs = [table, base_name, four_bit]
        upload.upload(on_upload, upload, [table, prompt_col, response_col, pending, load_note]).then(
            preview, preview_inputs, summary
        )
        for dropdown in (prompt_col, response_col):
            dropdown.change(on_mapping, [prompt_col, response_col, pending], [table, load_note]).then(
                preview, preview_inputs, summary
            )
        preset.click(lambda: (_table_from(load_preset()), "Loaded the emoji preset (10 rows)."), None,
                     [table, load_note]).then(preview, preview_inputs, summary)  # fmt: skip
        table.input(preview, preview_inputs, summary)
        train_button.click(train, [table, method, base_name, four_bit, rank, layers, positions, lr, epochs, state],
                           [status, curve, state, card, download], concurrency_limit=1,
                           concurrency_id="train")  # fmt: skip
        cancel_button.click(cancel_training, None, status, queue=False)
        ask.click(chat, [prompt, state], [plain_answer, tuned_answer], concurrency_limit=2)
        push_button.click(push, [repo_id, private, token, state], pushed)
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
