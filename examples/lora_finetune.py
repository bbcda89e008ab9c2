"""Fine-tune a small Llama with PEFT LoRA adapters on backend="mst".

    pip install peft
    python examples/lora_finetune.py              # S=2048, 3 steps
    python examples/lora_finetune.py --seq 8192

The model is built from a config with random weights (nothing is downloaded). LoRA adapts
the attention and MLP projections; mst chunks every MLP (adapters included) and the LM head
with its loss, and treats the adapters' rank-r up-projections as what they are (a low-rank
update, not a block to chunk), so `strict=True` compiles. The script prints the loss of each
step, next to the same steps without mst, and what mst rewrote.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import mst_compile


def build_model(vocab: int) -> torch.nn.Module:
    import peft
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1 << 16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, lora)


def train(model: torch.nn.Module, seq: int, steps: int, vocab: int, label: str) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(0, vocab, (1, seq), generator=data)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"  [{label}] step {step}  loss {loss.item():.5f}  {time.perf_counter() - start:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    model = build_model(args.vocab)
    plain = copy.deepcopy(model)
    model.compile(backend="mst", options={"strict": True})
    with mst_compile.collect_reports() as reports:
        train(model, args.seq, args.steps, args.vocab, "mst")
    train(plain, args.seq, args.steps, args.vocab, "eager")
    print()
    for report in reports:
        print(str(report).split("\n\n# ----")[0])  # the table, without the rewritten code


if __name__ == "__main__":
    main()
