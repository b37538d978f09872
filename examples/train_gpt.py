"""Trains a small GPT on a packed synthetic corpus with document masking, a
sliding window and soft-capping, through flexattn.torch or torch's own
flex_attention (--impl): the two differ by one import.

    python examples/train_gpt.py --impl flexattn --steps 200 --device cuda
    python examples/train_gpt.py --impl torch    --steps 200 --device cuda --compile

Prints the loss of every step and a JSON summary line (losses, tokens/s).
--expect-loss-drop makes it exit non-zero unless the mean loss of the last
quarter of the steps is below that of the first quarter (CI's check).
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_module(impl):
    """flex_attention and create_block_mask from the chosen implementation."""
    if impl == "flexattn":
        import flexattn.torch as flex
    else:
        import torch.nn.attention.flex_attention as flex
    return flex.flex_attention, flex.create_block_mask


def synthetic_batch(batch, seq, vocab, generator, device):
    """Packed rows of documents of random length; each document is an
    arithmetic progression mod vocab (start and step random), predictable
    from its first two tokens and so learnable only within the document."""
    tokens = torch.empty(batch, seq + 1, dtype=torch.long)
    docs = torch.empty(batch, seq + 1, dtype=torch.int32)
    for row in range(batch):
        pos, doc = 0, 0
        while pos < seq + 1:
            length = int(torch.randint(8, seq // 2, (1,), generator=generator))
            start, step = torch.randint(0, vocab, (2,), generator=generator).tolist()
            n = min(length, seq + 1 - pos)
            tokens[row, pos:pos + n] = (start + step * torch.arange(n)) % vocab
            docs[row, pos:pos + n] = doc
            pos, doc = pos + n, doc + 1
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device), docs[:, :-1].contiguous().to(device)


class Block(nn.Module):
    def __init__(self, width, heads, flex_attention, softcap):
        super().__init__()
        self.heads, self.flex_attention = heads, flex_attention
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

        def soft_cap(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)
        self.score_mod = soft_cap

    def forward(self, x, block_mask):
        B, S, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, C // self.heads) \
            .permute(2, 0, 3, 1, 4)
        y = self.flex_attention(q, k, v, score_mod=self.score_mod, block_mask=block_mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, S, C))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, seq, width, layers, heads, flex_attention, softcap):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(Block(width, heads, flex_attention, softcap)
                                    for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx, block_mask):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x, block_mask)
        return self.head(self.ln(x))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=["flexattn", "torch"], default="flexattn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--softcap", type=float, default=30.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="autocast dtype on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expect-loss-drop", action="store_true")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    flex_attention, create_block_mask = attention_module(args.impl)
    model = GPT(args.vocab, args.seq, args.width, args.layers, args.heads, flex_attention,
                args.softcap).to(device)
    run = torch.compile(model, fullgraph=True) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(args.seed + 1)
    window = args.window
    losses, tokens, elapsed = [], 0, 0.0
    for step in range(args.steps):
        x, y, docs = synthetic_batch(args.batch, args.seq, args.vocab, data, device)

        def document_window_causal(b, h, q_idx, kv_idx):
            causal = q_idx >= kv_idx
            windowed = q_idx - kv_idx <= window
            same_doc = docs[b, q_idx] == docs[b, kv_idx]
            return causal & windowed & same_doc
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        block_mask = create_block_mask(document_window_causal, args.batch, None, args.seq,
                                       args.seq, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=device.type == "cuda" and args.dtype == "bfloat16"):
            logits = run(x, block_mask)
            loss = F.cross_entropy(logits.float().view(-1, args.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step > 0 or args.steps == 1:  # the first step compiles
            elapsed += dt
            tokens += args.batch * args.seq
        losses.append(float(loss))
        print(f"step {step:4d}  loss {losses[-1]:.4f}  {dt * 1e3:.1f} ms", flush=True)

    quarter = max(1, len(losses) // 4)
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    summary = {"impl": args.impl, "device": str(device), "steps": args.steps,
               "first_quarter_loss": first, "last_quarter_loss": last,
               "final_loss": losses[-1], "tokens_per_s": tokens / elapsed if elapsed else None,
               "losses": losses}
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.expect_loss_drop and not (last < first and math.isfinite(last)):
        print(f"the loss did not fall: {first:.4f} -> {last:.4f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
