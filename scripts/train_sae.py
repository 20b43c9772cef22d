"""Train the sparse autoencoder that ships with the bundled model, and save it in the SAELens layout.

Reads the residual stream at one site (default `blocks.1.resid_post`) of the bundled model over the
training text (the corpus `scripts/prepare_corpus.py` writes; the held-out slice is never used for
training, it is where the quality report is measured), trains a standard ReLU SAE with an L1
penalty weighted by decoder norms (Anthropic's April 2024 recipe, simplified), re-initialises
latents that stay dead, folds the input scaling into the weights, and writes

    tdb_server/bundled/<model>/saes/<site>/cfg.json
    tdb_server/bundled/<model>/saes/<site>/sae_weights.safetensors
    tdb_server/bundled/<model>/saes/<site>/report.json      (hyper-parameters and quality)

Deterministic (seeded, one thread, fixed data order); a few minutes on 2 busy CPU cores.

    python scripts/train_sae.py                       # the default bundled model
    python scripts/train_sae.py --model austen --site blocks.1.resid_post --steps 3000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdb_server.model import load_model  # noqa: E402
from tdb_server.paths import resolve_model  # noqa: E402
from tdb_server.sae import Sae, SaeConfig, quality  # noqa: E402


def corpus_text(path: str | None) -> tuple[str, str]:
    """The training text: --corpus, else prepare_corpus's train.txt (fetched if needed)."""
    if path:
        return Path(path).read_text(encoding="utf-8"), path
    sys.path.insert(0, str(REPO / "scripts"))
    import prepare_corpus

    prepare_corpus.prepare(prepare_corpus.DEFAULT_CACHE)
    p = prepare_corpus.DEFAULT_CACHE / "train.txt"
    return p.read_text(encoding="utf-8"), str(p)


def activations(adapter, site: str, text: str, n_tokens: int, window: int, batch: int = 64) -> torch.Tensor:
    """[n, d_in] activations of `site` over the first n_tokens of the text, in windows."""
    ids = adapter.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = min(len(ids), n_tokens) // window
    ids = torch.tensor(ids[:n * window]).view(n, window)                         # [n, window]
    out = []
    for start in range(0, n, batch):
        with torch.no_grad():
            cache = adapter.run_with_cache(ids[start:start + batch], {site})[1]
        out.append(cache[site].flatten(0, 1).float())                           # [b * window, d_in]
    return torch.cat(out)


def train(x: torch.Tensor, d_sae: int, steps: int, batch: int, l1: float, lr: float, seed: int,
          log=print) -> tuple[dict[str, torch.Tensor], float]:
    """Train on x [n, d_in] (already scaled); returns (weights, scale folded later)."""
    g = torch.Generator().manual_seed(seed)
    n, d_in = x.shape
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = 0.1 * W_dec / W_dec.norm(dim=-1, keepdim=True)
    params = {"W_enc": W_dec.T.clone().contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
              "b_dec": x[:4096].median(dim=0).values.clone()}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr, betas=(0.9, 0.999))
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    perm = torch.randperm(n, generator=g)
    for step in range(steps):
        idx = perm[(step * batch) % n:(step * batch) % n + batch]
        if len(idx) < batch:
            perm = torch.randperm(n, generator=g)
            idx = perm[:batch]
        xb = x[idx]                                                               # [batch, d_in]
        frac = min(1.0, (step + 1) / (0.05 * steps))                              # L1 warm-up
        pre = (xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        a = pre.relu()                                                            # [batch, d_sae]
        x_hat = a @ params["W_dec"] + params["b_dec"]
        mse = (x_hat - xb).pow(2).sum(-1).mean()
        sparsity = (a * params["W_dec"].norm(dim=-1)).sum(-1).mean()
        loss = mse + frac * l1 * sparsity
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        with torch.no_grad():
            fired = (a > 0).any(0)
            last_fired[fired] = step
            if step in (steps // 4, steps // 2) and step > 0:                      # resample dead latents
                dead = (step - last_fired > steps // 10).nonzero().flatten()
                if len(dead):
                    err = (x_hat - xb).pow(2).sum(-1)
                    pick = torch.multinomial(err / err.sum(), len(dead), replacement=True, generator=g)
                    v = (xb[pick] - params["b_dec"])
                    v = v / v.norm(dim=-1, keepdim=True)
                    params["W_dec"][dead] = 0.1 * v
                    params["W_enc"][:, dead] = 0.1 * v.T
                    params["b_enc"][dead] = 0
                    last_fired[dead] = step
                    log(f"step {step}: resampled {len(dead)} dead latents")
            if step % 500 == 0 or step == steps - 1:
                ev = 1 - (x_hat - xb).pow(2).sum() / (xb - xb.mean(0)).pow(2).sum()
                log(f"step {step}: mse {mse.item():.3f} L0 {(a > 0).float().sum(-1).mean().item():.1f} "
                    f"EV {ev.item():.3f}")
    return {k: v.detach() for k, v in params.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundled model name or a model folder (default: the default bundled)")
    ap.add_argument("--site", default="blocks.1.resid_post")
    ap.add_argument("--corpus", default=None, help="training text (default: prepare_corpus's train.txt)")
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--l1", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: <model>/saes/<site>)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model_dir = Path(resolve_model(args.model))
    adapter = load_model(str(model_dir), device="cpu", dtype="float32")
    text, source = corpus_text(args.corpus)
    with torch.no_grad():
        x = activations(adapter, args.site, text, args.tokens, args.window)
    scale = (x.shape[1] ** 0.5) / x.norm(dim=-1).mean().item()                   # mean norm -> sqrt(d_in)
    print(f"{x.shape[0]} activations of {args.site} from {source}; input scale {scale:.4f}", flush=True)
    w = train(x * scale, args.d_sae, args.steps, args.batch, args.l1, args.lr, args.seed)
    # fold the input scale into the weights (as SAELens does for expected_average_only_in)
    w["W_dec"], w["b_dec"] = w["W_dec"] / scale, w["b_dec"] / scale
    w["W_enc"] = w["W_enc"] * scale
    cfg = SaeConfig("standard", x.shape[1], args.d_sae, args.site, apply_b_dec_to_input=True,
                    normalize_activations="none",
                    raw={"metadata": {"model_name": model_dir.name, "trained_by": "scripts/train_sae.py",
                                      "dataset_path": Path(source).name, "context_size": args.window}})
    sae = Sae(cfg, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"])
    out = Path(args.out) if args.out else model_dir / "saes" / args.site
    sae.save(out)
    q = quality(adapter, sae)
    report = {"site": args.site, "hparams": {k: v for k, v in vars(args).items() if k != "out"},
              "input_scale_folded": scale, "train_activations": x.shape[0], "quality_heldout": q.to_dict(),
              "wall_s": round(time.time() - t0, 1), "torch": torch.__version__}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["quality_heldout"], indent=1))
    print(f"wrote {out} in {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
