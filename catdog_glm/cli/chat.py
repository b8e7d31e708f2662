"""`catdog chat`: a terminal chat over the ChatEngine; also scriptable through a pipe."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from catdog_glm.chat.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from catdog_glm.cli._common import err_console, legacy_precision, user_errors
from catdog_glm.config import check_precision

MODEL_DEFAULT = (
    f"Default: the model's own (its generation_config.json; the embedded SmolLM2: its card's 0.2 / top_p 0.9), "
    f"else temperature {DEFAULT_TEMPERATURE}, top_p {DEFAULT_TOP_P}, top_k 0, repetition penalty 1.0."
)
HELP = "Commands: /clear (forget the conversation), /system TEXT (set the system prompt), /exit"

# Model options shared by `catdog chat` and `catdog serve-chat`.
ModelOption = Annotated[
    str | None,
    typer.Option(
        help="ChatGLM3 folder, Hugging Face model folder, .gguf file, or a model id: owner/name\\[@revision] "
        "(Hugging Face Hub) or modelscope:owner/name\\[@revision], downloaded once and then loaded offline "
        "(default: the embedded SmolLM2-135M-Instruct)."
    ),
]
QuantizeOption = Annotated[int | None, typer.Option(help="Weight-only quantization of the transformer blocks: 4 or 8.")]
PrecisionOption = Annotated[
    str,
    typer.Option(help="auto (bf16 where the hardware has it), bf16, fp16 or fp32; int8/int4 weights: --quantize."),
]
LegacyDtypeOption = Annotated[str | None, typer.Option("--dtype", hidden=True, help="Deprecated: --precision.")]
CHAT_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
NoCacheOption = Annotated[
    bool,
    typer.Option(
        "--no-cache", help="With --quantize: convert the weights again, neither reading nor writing the cache."
    ),
]
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Run Python code shipped in the model folder (off: never needed for ChatGLM3)."
    ),
]


def chat_precision(precision: str, dtype: str | None = None) -> str:
    """The compute dtype name for a chat model from --precision (or the deprecated --dtype)."""
    value = legacy_precision(precision, dtype=dtype)
    option = "--precision" if dtype is None else "--dtype"
    return check_precision(value, CHAT_PRECISIONS, "chat models", "int8/int4 weights: --quantize 8 or 4", option)


def load_engine(model, quantize, dtype, device, trust_remote_code, **limits):
    """The library's engine factory with a progress line and a one-line summary on stderr (CLI rendering only)."""
    from rich.progress import Progress
    from transformers.utils import logging as hf_logging

    from catdog_glm.chat.engine import load_engine as build_engine

    # our own progress line replaces transformers' per-tensor bars and notices
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    label = model or "the embedded default model (SmolLM2-135M-Instruct)"
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task(f"loading {label}", total=None)  # becomes a bar once shards are counted

        def on_shard(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=f"loading {label} (shard {done}/{total})")

        engine = build_engine(
            model,
            quantize=quantize,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            on_progress=on_shard,
            **limits,
        )
    i = engine.info()
    err_console.print(
        f"[bold]{i['name']}[/] · {i['kind']} · {i['parameters'] / 1e6:.0f}M parameters · {i['dtype']} · "
        f"{i['device']} · quantization {i['quantization']} · weights {i['weight_mib']:.0f} MiB · "
        f"context {i['context_window']} · "
        f"loaded in {engine.model.load_seconds:.1f} s",
        highlight=False,
    )
    return engine


@user_errors
def chat(
    model: ModelOption = None,
    quantize: QuantizeOption = None,
    precision: PrecisionOption = "auto",
    dtype: LegacyDtypeOption = None,
    device: DeviceOption = "auto",
    temperature: Annotated[
        float | None, typer.Option(help=f"Sampling temperature; 0 means greedy. {MODEL_DEFAULT}")
    ] = None,
    top_p: Annotated[float | None, typer.Option(help=f"Nucleus sampling probability mass. {MODEL_DEFAULT}")] = None,
    top_k: Annotated[
        int | None, typer.Option(help=f"Sample among the K most likely tokens (0 = off). {MODEL_DEFAULT}")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = DEFAULT_MAX_NEW_TOKENS,
    max_length: Annotated[int | None, typer.Option(help="ChatGLM-style limit on prompt + reply tokens.")] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(help=f"Penalty for repeating tokens (1.0 = off). {MODEL_DEFAULT}")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for reproducible sampling.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    no_cache: NoCacheOption = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Chat in the terminal: streamed replies, multi-turn history, /clear, /system TEXT, /exit.

    Example: printf 'What is the capital of France?\\n' | catdog chat --temperature 0
    """
    engine = load_engine(
        model, quantize, chat_precision(precision, dtype), device, trust_remote_code, use_cache=not no_cache
    )
    sampling = dict(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    try:
        interactive = sys.stdin.isatty()
        if interactive:
            err_console.print(HELP)
        history: list[dict] = []
        while True:
            try:
                line = input("\nYou: ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and line == "":
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/clear":
                history.clear()
                err_console.print("(conversation cleared)")
                continue
            if line.startswith("/system"):
                system = line[len("/system") :].strip() or None
                err_console.print(f"(system prompt {'set' if system else 'cleared'})")
                continue
            if line.startswith("/"):
                err_console.print(f"unknown command {line.split()[0]}. {HELP}")
                continue
            messages = ([{"role": "system", "content": system}] if system else []) + history
            messages.append({"role": "user", "content": line})
            generation = engine.stream(messages, **sampling)
            if interactive:
                sys.stdout.write("Assistant: ")
            try:
                for piece in generation:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                generation.cancel()
                err_console.print("\n(stopped)")
            sys.stdout.write("\n")
            sys.stdout.flush()
            reply = generation.reply
            if reply is None:
                continue
            if reply.truncated_messages:
                err_console.print(
                    f"(the {reply.truncated_messages} oldest message(s) no longer fit the context window "
                    "and were left out)"
                )
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply.text}]
    finally:
        # stop the scheduler's thread before the interpreter exits: a model thread still alive at exit can
        # abort the process in torch's thread pool teardown (seen as 'terminate called without an active exception')
        engine.close()
