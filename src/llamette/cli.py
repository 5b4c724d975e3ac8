"""The `llamette` command. Bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llamette import __version__
from llamette.chat_template import own_template
from llamette.compiling import report_to_stderr
from llamette.convert import FORMATS, convert, guess_format
from llamette.errors import BadParameter, LlametteError
from llamette.formats import find_tokenizer, load_weights
from llamette.formats.gguf import WRITTEN_TYPES
from llamette.generate import Generation, chat, generate
from llamette.kernels import set_threads
from llamette.kernels.kv_cache import KV_TYPES
from llamette.kernels.timing import MATMUL_PARTS
from llamette.model import Transformer
from llamette.perplexity import evaluate
from llamette.sampler import Adjustments, Sampler
from llamette.tokenizer import Tokenizer
from llamette.warm_up import COMMON_FILE_TYPES, check_file_type, warm_up

log = logging.getLogger("llamette")

# the story model that ships inside the package (see `llamette train`)
BUNDLED_MODEL = Path(__file__).parent / "bundled" / "model.bin"

# What run.c leaves out of its output: control characters other than whitespace.
UNPRINTABLE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a mistyped flag is an error, not a guess
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise LlametteError(message)

    def exit(self, status: int = 0, message: str | None = None):
        if status:
            raise LlametteError((message or "").strip())
        super().exit(status, message)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="llamette", description="Run Llama-2-family models on the CPU.")
    parser.add_argument("--version", action="version", version=f"llamette {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="generate text or chat with a model",
        description="Generate text or chat, with llama2.c's run.c flags, meanings and defaults.",
    )
    add_model_arguments(run)
    run.add_argument(
        "-t",
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="0 is greedy (default 1.0)",
    )
    run.add_argument(
        "-p",
        "--top-p",
        "--topp",
        dest="topp",
        type=float,
        default=0.9,
        metavar="P",
        help="nucleus sampling threshold in [0, 1]; 0 or 1 turns it off (default 0.9)",
    )
    run.add_argument(
        "-k",
        "--top-k",
        dest="topk",
        type=int,
        default=0,
        metavar="K",
        help="sample from the k most likely tokens only; 0 turns it off (default)",
    )
    adjustments = (  # flag, help: llama.cpp's names; none given keeps run.c's sampling
        ("--min-p", float, 0.0, "keep tokens at least this times as likely as the top one (0: off)"),
        ("--repeat-penalty", float, 1.0, "divide a recent token's logit above 0 by it, multiply one below (1: off)"),
        ("--repeat-last-n", int, 64, "how many recent tokens the penalties look at (-1: all, 0: none)"),
        ("--presence-penalty", float, 0.0, "subtract from the logit of each recent token (0: off)"),
        ("--frequency-penalty", float, 0.0, "subtract this times its count from each recent token's logit"),
    )  # fmt: skip
    for flag, kind, default, text in adjustments:
        run.add_argument(
            flag, type=kind, default=default, metavar="X", help=f"{text} (default {default})"
        )
    run.add_argument(
        "-l", "--logit-bias", action="append", default=[], metavar="ID(+/-)BIAS",
        help="add BIAS to token ID's logit, as llama.cpp writes it: 15043+1, 2-inf (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "--stop", action="append", default=[], metavar="TEXT",
        help="generate: end where the text first shows TEXT, which is left out (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "--stop-token-id", action="append", default=[], type=int, metavar="ID",
        help="generate: end at token ID too, beside the model's own end tokens (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "-s",
        "--seed",
        type=int,
        default=0,
        metavar="SEED",
        help="random seed; 0 or less uses the current time (default)",
    )
    run.add_argument(
        "-n",
        "--steps",
        type=int,
        default=256,
        metavar="STEPS",
        help="positions to run, prompt included; 0 means the whole context (default 256)",
    )
    run.add_argument(
        "-i", "--prompt", metavar="PROMPT", help="the prompt (chat: the first user message)"
    )
    run.add_argument(
        "-m",
        "--mode",
        choices=("generate", "chat"),
        default="generate",
        metavar="MODE",
        help="generate (default) or chat (Llama 2's format, or a GGUF's own chat template)",
    )
    run.add_argument(
        "-y",
        "--system-prompt",
        "--system",
        dest="system_prompt",
        metavar="SYSTEM",
        help="chat: the system prompt",
    )
    run.add_argument(
        "--exact",
        action="store_true",
        help="use the reference kernels: run.c's and runq.c's arithmetic to the bit",
    )
    add_cache_type_argument(run)
    run.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object at the end instead of streaming text",
    )
    run.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="threads for the kernels (default: $LLAMETTE_THREADS, else every core)",
    )
    run.add_argument(
        "--profile",
        action="store_true",
        help="after the run, show on stderr where a decode step's time went",
    )
    run.set_defaults(handler=cmd_run)

    convert = commands.add_parser(
        "convert",
        help="convert a model to a llama2.c or GGUF file (or tokenizer.model to .bin)",
        description="Convert a Meta or Hugging Face folder, a llama2.c or a GGUF file to a "
        "llama2.c or GGUF file, one tensor in memory at a time; or a SentencePiece "
        "tokenizer.model to llama2.c's tokenizer.bin.",
    )
    convert.add_argument("source", metavar="SRC", help="Meta or Hugging Face folder, or model file")
    convert.add_argument("out", metavar="OUT", help="the file to write")
    convert.add_argument(
        "--format",
        choices=FORMATS,
        metavar="FORMAT",
        help=f"one of {', '.join(FORMATS)} (default: gguf for a .gguf OUT, else llama2c-v0)",
    )
    convert.add_argument(
        "--type",
        dest="weight_type",
        choices=WRITTEN_TYPES,
        metavar="TYPE",
        help=f"weight type: {', '.join(WRITTEN_TYPES)} (GGUF, default: the source's; q4_k_m and the "
        "like are llama.cpp's mixes of types; llama2c v0/v1 are f32, v2 q8_0)",
    )
    convert.add_argument(
        "--group-size",
        type=int,
        metavar="N",
        help="llama2c-v2: values per scale (default: 64, halved until it divides dim)",
    )
    convert.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="GGUF: tokenizer to embed (default: the source's own, or one beside it)",
    )
    convert.add_argument(
        "--seq-len",
        type=int,
        metavar="N",
        help="context length for a Meta folder, which does not state one (default 2048)",
    )
    convert.set_defaults(handler=cmd_convert)

    quantize = commands.add_parser(
        "quantize",
        help="quantize a model (shorthand for convert --type)",
        description="Write IN with its matrices in another weight type: GGUF when OUT ends in "
        ".gguf, else llama2.c v2 (q8_0 only).",
    )
    quantize.add_argument("source", metavar="IN", help="model file or folder")
    quantize.add_argument("out", metavar="OUT", help="the file to write")
    quantize.add_argument(
        "--type",
        dest="weight_type",
        required=True,
        choices=QUANTIZED_TYPES,
        metavar="TYPE",
        help=f"one of {', '.join(QUANTIZED_TYPES)}",
    )
    quantize.add_argument(
        "--group-size", type=int, metavar="N", help="llama2.c v2: values per scale"
    )
    quantize.add_argument("--tokenizer", metavar="PATH", help="GGUF: tokenizer to embed")
    quantize.set_defaults(handler=cmd_quantize, format=None, seq_len=None)

    perplexity = commands.add_parser(
        "perplexity",
        help="perplexity over a text, and KL divergence from a reference model",
        description="Score every next token of a text (in windows of the context, each led by "
        "BOS): mean negative log-likelihood and perplexity; with --reference, the mean KL "
        "divergence KL(reference || model) of the next-token distributions.",
    )
    perplexity.add_argument("model", help="model file: llama2.c or GGUF (any weight type)")
    perplexity.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    perplexity.add_argument(
        "--reference", metavar="MODEL", help="model to compare with (same vocabulary)"
    )
    perplexity.add_argument(
        "-z", "--tokenizer", metavar="TOKENIZER", help="as for run (default: found as run finds it)"
    )
    perplexity.add_argument(
        "--ctx", type=int, metavar="N", help="window length (default: the model's context)"
    )
    perplexity.add_argument("--threads", type=int, metavar="N", help="threads for the kernels")
    perplexity.add_argument("--json", action="store_true", help="print one JSON object")
    add_cache_type_argument(perplexity, " (the reference keeps f32)")
    perplexity.set_defaults(handler=cmd_perplexity)

    serve = commands.add_parser(
        "serve",
        help="serve a model over OpenAI's HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health), decoding up to --max-batch requests "
        "together.",
    )
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    serve.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="N",
        help="requests decoded together, each with its own KV-cache slot (default 16)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests that may wait for a slot; beyond, 429 (default 64)",
    )
    serve.add_argument(
        "--ctx", type=int, metavar="N", help="positions per slot (default: the model's context)"
    )
    serve.add_argument(
        "--kv-budget", type=int, metavar="POSITIONS",
        help="KV-cache positions all requests hold together, taken as they are written; beyond, "
        "the latest request waits to resume (default: what fits in half the memory available "
        "beside the weights)",
    )  # fmt: skip
    add_cache_type_argument(serve)
    serve.add_argument("--threads", type=int, metavar="N", help="threads for the kernels")
    serve.add_argument("--name", help="the model's name in the API (default: the file's stem)")
    serve.add_argument(
        "--api-key", default=os.environ.get("LLAMETTE_API_KEY"), metavar="KEY",
        help="ask every request but /health for 'Authorization: Bearer KEY' "
        "(default: $LLAMETTE_API_KEY; none: open)",
    )  # fmt: skip
    serve.add_argument(
        "--max-body", type=int, metavar="BYTES",
        help="answer larger request bodies 413 (default 8 MiB)",
    )  # fmt: skip
    serve.add_argument(
        "--replicas", type=int, metavar="N",
        help="serve with N replicas on a Ray cluster (Ray Serve; --threads each, default 1; "
        "needs llamette[ray])",
    )  # fmt: skip
    serve.add_argument(
        "--ray-address", metavar="ADDR",
        help="with --replicas: the Ray cluster to join ('auto': the one this machine is part "
        "of; default: start one on this machine)",
    )  # fmt: skip
    serve.add_argument(
        "--request-timeout", type=float, metavar="SECONDS",
        help="with --replicas: Ray Serve ends a request unanswered after SECONDS with a 408, "
        "one lost with a replica that died included (default: no limit)",
    )  # fmt: skip
    serve.set_defaults(handler=cmd_serve)

    warm_up = commands.add_parser(
        "warm-up",
        help="compile the kernels of common GGUF file types ahead of their first run",
        description="Compile, into the kernel cache, what a first run of a model of each file "
        "type compiles (its weight types' products and its forward pass), on a small stand-in "
        "model of the type's mix: a downloaded model of that type then starts as on a warm "
        "cache. Once per llamette version and CPU.",
    )
    warm_up.add_argument(
        "file_types", nargs="*", metavar="TYPE", default=list(COMMON_FILE_TYPES),
        help=f"llama.cpp file types or weight types (default: {' '.join(COMMON_FILE_TYPES)}; "
        f"any of {', '.join(WRITTEN_TYPES)})",
    )  # fmt: skip
    add_cache_type_argument(warm_up)
    warm_up.set_defaults(handler=cmd_warm_up)

    train = commands.add_parser(
        "train",
        help="train the demo story model (needs llamette[train])",
        description="Generate the story corpus, train its tokenizer and a small Llama with "
        "PyTorch on the CPU, and write model.bin (llama2.c v1), model_q80.bin (v2), "
        "tokenizer.bin, tokenizer.model and train-log.json into OUT_DIR. The defaults make the "
        "bundled model.",
    )
    train.add_argument("out_dir", metavar="OUT_DIR", help="folder to write into")
    train.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default 1000)")
    train.add_argument("--seed", type=int, metavar="SEED", help="seed of everything (default 1)")
    train.set_defaults(handler=cmd_train)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL (default: the bundled one) and -z TOKENIZER, as run and serve take them."""
    parser.add_argument(
        "model",
        nargs="?",
        default=str(BUNDLED_MODEL),
        help="model file: llama2.c (v0, v1, v2) or GGUF (default: the bundled story model)",
    )
    parser.add_argument(
        "-z",
        "--tokenizer",
        metavar="TOKENIZER",
        help="tokenizer.bin or tokenizer.model (default: a GGUF's own, or one beside the model)",
    )


def main(argv: list[str] | None = None) -> int:
    report_to_stderr()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.handler(args)
    except LlametteError as error:
        print(f"llamette: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if isinstance(error, BrokenPipeError):
            return 1
        where = f"{error.filename}: " if error.filename else ""
        print(f"llamette: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the interrupted line: the shell's prompt starts its own
        return 130
    except SystemExit as done:  # --help and --version, printed
        return int(done.code or 0)


def add_cache_type_argument(command: argparse.ArgumentParser, note: str = "") -> None:
    command.add_argument(
        "--cache-type", choices=list(KV_TYPES), default="f32",
        help="the KV cache's values: f32 (run.c's), f16 or q8_0 (32-value blocks), in half and "
        f"about a quarter of the memory{note}",
    )  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    check_sampling_flags(args)
    for flag, given in (("--json", args.json), ("--stop", args.stop),
                        ("--stop-token-id", args.stop_token_id)):  # fmt: skip
        if given and args.mode == "chat":
            raise LlametteError(f"{flag}: works with -m generate only")
    use_threads(args.threads)
    model = Transformer.load(args.model, exact=args.exact, kv_type=args.cache_type)
    model.adapt_threads = args.threads is None  # --threads N forces N
    tokenizer = find_tokenizer(args.model, args.tokenizer, model.config.vocab_size, "-z")
    model.warm_up()  # so that the speeds reported are the kernels', not their loading
    if args.profile:
        model.start_profile()
    steps = clamp_steps(args.steps, model.config.seq_len)
    try:
        sampler = sampler_for(args, model.config.vocab_size)
    except BadParameter as error:  # named as the flag that set it
        raise LlametteError(f"--{error.name.replace('_', '-')}: {error.problem}") from None
    sampler.warm_up()
    on_text = None if args.json else print_stream
    if args.mode == "generate":
        for token in args.stop_token_id:
            if not 0 <= token < model.config.vocab_size:
                raise LlametteError(f"--stop-token-id: {token} is not a token id within "
                                    f"0..{model.config.vocab_size - 1}")  # fmt: skip
        result = generate(model, tokenizer, sampler, args.prompt or "", steps, on_text,
                          args.stop, args.stop_token_id)  # fmt: skip
        if on_text:
            print_stream("\n")
    else:
        result = chat(
            model,
            tokenizer,
            sampler,
            user_messages(args.prompt),
            read_system_prompt(args.system_prompt),
            steps,
            on_text,
            own_template(args.model),
        )
    if args.json:
        print(json.dumps(result_json(result), ensure_ascii=False))
    if result.context_full:
        log.info(
            "the model's context of %d tokens is full%s", model.config.seq_len,
            "; the conversation cannot go on" if args.mode == "chat" else "",
        )  # fmt: skip
    report_speed(result)
    if args.profile:
        report_profile(model)
    return 0


QUANTIZED_TYPES = tuple(kind for kind in WRITTEN_TYPES if kind != "f32")


def cmd_convert(args: argparse.Namespace) -> int:
    if args.group_size is not None and args.group_size <= 0:
        raise LlametteError(f"--group-size: must be positive, not {args.group_size}")
    if args.seq_len is not None and args.seq_len <= 0:
        raise LlametteError(f"--seq-len: must be positive, not {args.seq_len}")
    start = time.perf_counter()
    if args.source.endswith(".model"):  # a SentencePiece tokenizer to llama2.c's tokenizer.bin
        tokenizer = Tokenizer.load(args.source)
        tokenizer.save(args.out)
        log.info(f"wrote {args.out}: {tokenizer.vocab_size} pieces from {args.source}")
        return 0
    weights, weight_type = convert(
        args.source,
        args.out,
        args.format,
        args.weight_type,
        args.group_size,
        args.tokenizer,
        args.seq_len,
        progress=sys.stderr.isatty(),
    )
    c = weights.config
    log.info(
        f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, {args.format or guess_format(args.out)} "
        f"{weight_type}) "
        f"from {args.source}: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads, "
        f"{c.n_kv_heads} kv heads, vocab {c.vocab_size}, in {time.perf_counter() - start:.1f} s"
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    if not args.out.lower().endswith(".gguf"):
        if args.weight_type != "q8_0":
            raise LlametteError(
                f"--type {args.weight_type}: llama2.c files hold q8_0 only; name OUT *.gguf"
            )
        args.format = "llama2c-v2"
    return cmd_convert(args)


def cmd_perplexity(args: argparse.Namespace) -> int:
    if args.ctx is not None and args.ctx < 2:
        raise LlametteError(f"--ctx: must be at least 2, not {args.ctx}")
    use_threads(args.threads)
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise LlametteError(f"{args.text}: not UTF-8 text") from None
    model = Transformer(load_weights(args.model, dequantize=True), kv_type=args.cache_type)
    reference = (
        Transformer(load_weights(args.reference, dequantize=True)) if args.reference else None
    )
    for forced in (model, reference) if args.threads is not None else ():
        if forced is not None:
            forced.adapt_threads = False  # --threads N forces N
    tokenizer = find_tokenizer(args.model, args.tokenizer, model.config.vocab_size, "-z")
    tokens = tokenizer.encode(text, bos=False)
    for which, config in (("model", model.config), ("reference", reference and reference.config)):
        if config and args.ctx and args.ctx > config.seq_len:
            log.info(f"--ctx: {args.ctx} is beyond the {which}'s context of {config.seq_len}; "
                     f"using {config.seq_len}")  # fmt: skip
            args.ctx = config.seq_len
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    result = evaluate(model, tokens, args.ctx, reference, sys.stderr.isatty(), bos_id)
    if args.json:
        fields = {"tokens": result.tokens, "mean_nll": result.mean_nll, "perplexity": result.perplexity,
                  "mean_kl": result.mean_kl, "seconds": result.seconds}  # fmt: skip
        print(json.dumps(fields))
        return 0
    line = f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.5f} nats over {result.tokens} tokens)"
    if result.mean_kl is not None:
        line += f"; mean KL from {os.path.basename(args.reference)} {result.mean_kl:.6f} nats"
    print(line)
    log.info(
        f"scored {result.tokens} tokens in {result.seconds:.1f} s ({result.tokens / result.seconds:.0f} tok/s)"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from llamette import server
    except ImportError as error:
        raise LlametteError(f"serve: {error.name} is missing: pip install llamette") from None
    if not 0 <= args.port <= 65535:
        raise LlametteError(f"--port: {args.port} is outside 0..65535")
    name = args.name or ("llamette-stories" if args.model == str(BUNDLED_MODEL) else None)
    if args.max_body is not None and args.max_body < 1:
        raise LlametteError(f"--max-body: {args.max_body} is not a positive number of bytes")
    if args.api_key is not None and not args.api_key.strip():
        raise LlametteError("--api-key: empty (leave it out to serve without a key)")
    if args.replicas is not None or args.ray_address is not None:
        return serve_on_ray(args, name)
    if args.request_timeout is not None:
        raise LlametteError("--request-timeout: goes with --replicas (Ray Serve's proxy keeps it)")
    use_threads(args.threads)
    sock = server.listen(args.host, args.port)
    served = server.ServedModel.load(
        args.model, args.tokenizer, args.max_batch, args.max_queue, args.ctx, name,
        args.kv_budget, args.cache_type,
    )  # fmt: skip
    served.api_key = args.api_key
    served.max_body = args.max_body or served.max_body
    served.engine.model.adapt_threads = args.threads is None  # --threads N forces N
    engine = served.engine
    budget_bytes = engine.kv_budget * server.kv_position_bytes(engine.model.config, args.cache_type)
    host, port = sock.getsockname()[:2]
    log.info(
        f"serving {served.name} ({args.model}) at http://{host}:{port}/v1: up to "
        f"{engine.n_slots} requests of up to {engine.model.config.seq_len} positions at once, "
        f"a KV budget of {engine.kv_budget} positions ({args.cache_type}, "
        f"{budget_bytes / 2**20:.0f} MiB, taken as they are written), "
        f"chat template {served.template.name}" + (", API key required" if served.api_key else "")
    )
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C, cutting the stop short
        server.run_server(served, sock)
    log.info("stopped")
    return 0


def serve_on_ray(args: argparse.Namespace, name: str | None) -> int:
    """`serve --replicas N`: deploy llamette.ray's application on a Ray cluster (joined, or
    started on this machine), serve until SIGTERM or Ctrl-C, then take it down."""
    import signal
    import threading

    try:
        import ray
        from ray import serve

        from llamette.ray import app
    except ImportError:
        raise LlametteError("--replicas: needs Ray Serve: pip install 'llamette[ray]'") from None
    if args.replicas is None or args.replicas < 1:
        raise LlametteError(f"--replicas: {args.replicas} is not a number of replicas (1 or more)")
    if args.threads is not None and args.threads < 1:
        raise LlametteError(f"--threads: {args.threads} is not 1 or more")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise LlametteError(f"--request-timeout: {args.request_timeout} is not a positive time")
    if args.ray_address is None and not os.path.exists(args.model):  # a cluster of this machine
        raise LlametteError(f"{args.model}: no such file")
    options = {"model": os.path.abspath(args.model) if args.ray_address is None else args.model,
               "replicas": args.replicas, "threads": args.threads or 1,
               "max_batch": args.max_batch, "max_queue": args.max_queue, "ctx": args.ctx,
               "name": name, "kv_budget": args.kv_budget, "kv_type": args.cache_type,
               "tokenizer": args.tokenizer, "api_key": args.api_key}  # fmt: skip
    application = app({key: value for key, value in options.items() if value is not None})
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # in place of ray.init's own
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "request_timeout_s": args.request_timeout})  # fmt: skip
        try:
            serve.run(application, name="llamette", route_prefix="/")
        except RuntimeError as error:  # a replica's constructor failed: say its own error
            status = serve.status().applications.get("llamette")
            replica = status.deployments.get("Replica") if status else None
            said = re.findall(r"LlametteError: (.+)", replica.message if replica else "")
            raise LlametteError(f"--replicas: the replicas did not start: "
                                f"{said[-1] if said else error}") from None  # fmt: skip
        log.info(f"serving {name or os.path.basename(args.model)} on Ray: {args.replicas} "
                 f"replicas of {args.threads or 1} threads at http://{args.host}:{args.port}/v1")  # fmt: skip
        while not stop.wait(0.5):
            pass
        serve.shutdown()
    finally:
        ray.shutdown()
    log.info("stopped")
    return 0


def cmd_warm_up(args: argparse.Namespace) -> int:
    for file_type in args.file_types:  # all, before the first takes its time
        check_file_type(file_type)
    for i, file_type in enumerate(args.file_types, 1):
        seconds = warm_up(file_type, args.cache_type)
        log.info("%s ready (%d of %d, %.1f s)", file_type, i, len(args.file_types), seconds)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise LlametteError("train: needs PyTorch: pip install 'llamette[train]'") from None
    from dataclasses import replace

    from llamette.training.train import TrainConfig, train

    config = TrainConfig()
    for field in ("steps", "seed"):
        value = getattr(args, field)
        if value is not None:
            if value <= 0:
                raise LlametteError(f"--{field}: must be positive, not {value}")
            config = replace(config, **{field: value})
    log.info(f"training into {args.out_dir}: {config}")

    def report(row: dict) -> None:
        log.info(
            f"step {row['step']}: train loss {row['train_loss']:.4f}, "
            f"held-out {row['heldout_loss']:.4f}"
        )

    result = train(args.out_dir, config, progress=sys.stderr.isatty(), on_eval=report)
    log.info(
        f"held-out loss {result['heldout_loss']:.4f} (perplexity {result['heldout_perplexity']:.3f}) "
        f"after {result['seconds'] / 60:.1f} minutes; wrote {args.out_dir}/model.bin"
    )
    return 0


def use_threads(threads: int | None) -> None:
    try:
        set_threads(threads)
    except ValueError as error:
        source = "--threads" if threads is not None else "LLAMETTE_THREADS"
        raise LlametteError(f"{source}: {error}") from None


def sampler_for(args: argparse.Namespace, vocab_size: int) -> Sampler:
    """The sampler the run's flags ask for."""
    return Sampler(
        vocab_size,
        temperature=args.temperature,
        topp=args.topp,
        seed=args.seed if args.seed > 0 else None,
        topk=args.topk,
        adjust=Adjustments(
            repeat_penalty=args.repeat_penalty,
            repeat_last_n=args.repeat_last_n,
            frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty,
            min_p=args.min_p,
            logit_bias=parse_logit_bias(args.logit_bias, vocab_size),
        ),  # fmt: skip
    )


def check_sampling_flags(args: argparse.Namespace) -> None:
    if not args.temperature >= 0.0:
        raise LlametteError(f"-t/--temperature: {args.temperature} is not 0 or more")
    if not 0.0 <= args.topp <= 1.0:
        raise LlametteError(f"-p/--top-p: {args.topp} is outside [0, 1]")
    if args.topk < 0:
        raise LlametteError(f"-k/--top-k: {args.topk} is negative (0 turns top-k off)")
    if not 0.0 <= args.min_p <= 1.0:
        raise LlametteError(f"--min-p: {args.min_p} is outside [0, 1]")
    if not args.repeat_penalty > 0.0:
        raise LlametteError(f"--repeat-penalty: {args.repeat_penalty} is not above 0")
    if args.repeat_last_n < -1:
        raise LlametteError(f"--repeat-last-n: {args.repeat_last_n} is below -1 (all)")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(args, name) <= 2.0:
            raise LlametteError(
                f"--{name.replace('_', '-')}: {getattr(args, name)} is outside [-2, 2]"
            )


LOGIT_BIAS = re.compile(r"(\d+)([+-](?:inf|\d+(?:\.\d*)?(?:e[+-]?\d+)?))", re.IGNORECASE)


def parse_logit_bias(values: list[str], vocab_size: int) -> dict[int, float]:
    """--logit-bias flags (llama.cpp's ID+BIAS, ID-BIAS) as {token id: bias}."""
    bias = {}
    for value in values:
        match = LOGIT_BIAS.fullmatch(value.strip())
        if match is None:
            raise LlametteError(f"--logit-bias: {value!r} is not TOKEN_ID+BIAS or TOKEN_ID-BIAS")
        token = int(match.group(1))
        if token >= vocab_size:
            raise LlametteError(
                f"--logit-bias: {token} is not a token id within 0..{vocab_size - 1}"
            )
        bias[token] = float(match.group(2))
    return bias


def clamp_steps(steps: int, seq_len: int) -> int:
    """run.c's rule: 0 or beyond the context means the whole context. (run.c also takes a
    negative count so; here it is a mistake, refused.)"""
    if steps < 0:
        raise LlametteError(f"-n/--steps: {steps} is negative (0 means the whole context)")
    if steps > seq_len:
        log.info(
            "-n/--steps: %d is beyond the model's context of %d; using %d", steps, seq_len, seq_len
        )
    return steps if 0 < steps <= seq_len else seq_len


def user_messages(first: str | None) -> Callable[[], str | None]:
    """The chat's source of user turns: the -i prompt first, then lines typed on stdin."""
    pending = [first] if first is not None else []

    def read() -> str | None:
        return pending.pop() if pending else read_line("User: ")

    return read


def read_system_prompt(given: str | None) -> str:
    if given is not None:
        return given
    return read_line("Enter system prompt (optional): ") or ""


def read_line(guide: str) -> str | None:
    """A line from stdin after printing guide on stdout (as run.c does); None at end of input."""
    print_stream(guide)
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def print_stream(text: str) -> None:
    sys.stdout.write(UNPRINTABLE.sub("", text))
    sys.stdout.flush()


def result_json(result: Generation) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "tokens": result.tokens,
        "text": result.text,
        "prefill_tok_s": round(result.prefill_tok_s, 2),
        "decode_tok_s": round(result.decode_tok_s, 2),
    }


def report_profile(model: Transformer) -> None:
    """Where a decode step's time went, per part of the step and per kind of kernel."""
    report = model.profile_report()
    total = sum(us for _, us, _ in report) or 1.0
    lines = [f"profile of {model.profiled_steps} decode steps, {total:.0f} us each:"]
    for part, us, gb_s in report:
        rate = f"  {gb_s:5.1f} GB/s of weights" if gb_s else ""
        lines.append(f"  {part:15s} {us:9.1f} us  {100 * us / total:5.1f}%{rate}")
    kinds = {
        "matmul": sum(us for part, us, _ in report if part in MATMUL_PARTS),
        "attention": sum(us for part, us, _ in report if part == "attention"),
        "norms": sum(us for part, us, _ in report if part.endswith("norm")),
    }
    kinds["other"] = total - sum(kinds.values())
    lines.append(
        "  by kind: " + ", ".join(f"{kind} {100 * us / total:.0f}%" for kind, us in kinds.items())
    )
    log.info("\n".join(lines))


def report_speed(result: Generation) -> None:
    if not result.prefill_tokens and not result.decode_tokens:
        return  # nothing ran (the chat ended before its first turn)
    log.info(
        "prefill %d tokens at %.1f tok/s, decode %d tokens at %.1f tok/s",
        result.prefill_tokens,
        result.prefill_tok_s,
        result.decode_tokens,
        result.decode_tok_s,
    )
