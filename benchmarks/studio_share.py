"""The Studio shared by two people: one trains the emoji ReFT demo while the other chats, side by side.

Three runs of the same training (hub_peft's default demo config on the embedded SmolLM2-135M-Instruct):
alone; next to a chat loop with the cores split as the Studio splits them (``hub_peft.training.queue.
Cores``: one core for the chat, the rest for the training); and next to the same chat loop with every
thread count left at the machine's core count (what two unaware workers do: oversubscribed). The chat
loop answers a 24-token prompt over and over on its own model instance, as the Studio's chat does.

Run: .venv/bin/python benchmarks/studio_share.py
"""

from __future__ import annotations

import statistics
import threading
import time

from _machine import cpu_description


def main() -> None:
    import torch

    from hub_peft.base_model import load_base_model
    from hub_peft.chat import generate_reply
    from hub_peft.presets import load_preset
    from hub_peft.training import TrainSettings, train_adapter
    from hub_peft.training.queue import Cores

    train_base, chat_base = load_base_model(None), load_base_model(None)
    cores = Cores()
    print(f"cpu: {cpu_description()}; {cores.total} cores")
    rows = load_preset()

    def run(mode: str) -> tuple[float, list[float]]:
        stop, latencies = threading.Event(), []

        def chat() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                if mode == "split":
                    with cores.chat():
                        generate_reply(chat_base[0], chat_base[1], "Write a poem about the sea", max_new_tokens=24)
                else:
                    torch.set_num_threads(cores.total)
                    generate_reply(chat_base[0], chat_base[1], "Write a poem about the sea", max_new_tokens=24)
                latencies.append(time.perf_counter() - started)

        chatter = threading.Thread(target=chat) if mode != "alone" else None
        if chatter:
            chatter.start()
        started = time.perf_counter()
        if mode == "oversubscribed":
            torch.set_num_threads(cores.total)
            trained = train_adapter(rows, TrainSettings(), base=train_base)
        else:  # alone, the split gives the training every core
            with cores.train() as share:
                trained = train_adapter(rows, TrainSettings(), base=train_base, on_step=lambda _: share())
        seconds = time.perf_counter() - started
        trained.release()
        stop.set()
        if chatter:
            chatter.join()
        return seconds, latencies

    results = {mode: run(mode) for mode in ("alone", "split", "oversubscribed")}
    alone = results["alone"][0]
    print("emoji ReFT demo (30 epochs, layers 8+16), training seconds and chat answers (24 tokens) meanwhile:")
    for mode, (seconds, latencies) in results.items():
        chat = (
            f"{len(latencies)} answers, p50 {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s"
            if latencies
            else "no chat"
        )
        print(f"  {mode:15s}: training {seconds:6.1f} s ({seconds / alone:.2f}x alone); {chat}")
    split, over = results["split"][0], results["oversubscribed"][0]
    print(f"  the Studio's core split trains {over / split:.2f}x faster than oversubscribed threads next to a chat")


if __name__ == "__main__":
    main()
