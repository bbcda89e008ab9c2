"""Command line: `python -m mst_compile explain ...` prints what mst does to a model."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .demo_models import LlamaConfig, LlamaProxy, NanoGPT
from .explain import explain
from .options import COMPILERS

# Small widths so any HF architecture builds in seconds with random weights; the standard
# attribute names are mapped by each config class (GPT-2's n_embd, ...).
HF_SMALL = {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 1024,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}


def build_model(spec: str, vocab: int | None) -> torch.nn.Module:
    """`demo` (Llama-shaped), `demo-gpt` (nanoGPT), `hf:<model_type>` (a small HF config of
    that family), or a path to an HF config.json; random weights, nothing downloaded."""
    if spec == "demo":
        return LlamaProxy(LlamaConfig(vocab_size=vocab or 16000))
    if spec == "demo-gpt":
        return NanoGPT(vocab_size=vocab or 16000, hidden=256, max_len=1 << 16)
    try:
        import transformers
    except ImportError as e:
        raise SystemExit(f"--model {spec} needs transformers: pip install 'mst-compile[examples]'") from e
    if spec.startswith("hf:"):
        overrides = dict(HF_SMALL, **({"vocab_size": vocab} if vocab else {}))
        config = transformers.AutoConfig.for_model(spec[3:], **overrides)
    else:
        with open(spec) as f:
            data = json.load(f)
        if vocab:
            data["vocab_size"] = vocab
        config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    if hasattr(config, "max_position_embeddings"):
        config.max_position_embeddings = max(config.max_position_embeddings, 1 << 16)
    if hasattr(config, "n_positions"):
        config.n_positions = max(config.n_positions, 1 << 16)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def _chunks(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mst_compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="compile a model with backend='mst' and print the report")
    ex.add_argument("--model", default="demo",
                    help="demo | demo-gpt | hf:<model_type> (e.g. hf:llama, hf:qwen2, hf:gpt2) "
                         "| path/to/config.json (default: demo)")
    ex.add_argument("--seq", type=_positive, default=2048, help="sequence length (default 2048)")
    ex.add_argument("--batch", type=_positive, default=1)
    ex.add_argument("--vocab", type=_positive, help="override the vocabulary size")
    ex.add_argument("--inference", action="store_true", help="explain the no_grad forward")
    ex.add_argument("--chunks", default="auto", type=_chunks, help="int >= 1 or 'auto'")
    ex.add_argument("--memory-budget", type=_positive, help="bytes for one region's intermediate")
    ex.add_argument("--min-bytes", type=_non_negative, help="skip regions smaller than this (bytes)")
    ex.add_argument("--compiler", choices=COMPILERS, default="inductor",
                    help="'eager' runs the rewritten graphs op by op (no code generation)")
    ex.add_argument("--format", choices=("text", "json"), default="text")
    ex.add_argument("--no-code", action="store_true", help="omit the rewritten graphs")
    args = parser.parse_args(argv)

    options = {"chunks": args.chunks, "compiler": args.compiler}
    if args.memory_budget is not None:
        options["memory_budget"] = args.memory_budget
    if args.min_bytes is not None:
        options["min_bytes"] = args.min_bytes
    torch.manual_seed(0)
    model = build_model(args.model, args.vocab)
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") \
        else model.lm_head.weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    is_hf = not isinstance(model, (LlamaProxy, NanoGPT))
    call = {"input_ids": ids, "labels": ids} if is_hf else {"ids": ids, "labels": ids}
    if args.inference:
        call.pop("labels")
        with torch.no_grad():
            report = explain(model, options=options, **call)
    else:
        report = explain(model, options=options, **call)
    if args.no_code:
        for g in report.graphs:
            g.code = ""
    print(report.to_json() if args.format == "json" else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
