r"""A VAE on scikit-learn's digits: which amortized posterior gives the best held-out likelihood?

Run ``python -m benchmarks.vae`` (``--quick`` for a smoke run). It writes
``benchmarks/results/vae.md`` and ``vae.json``.

Data: the 1797 8x8 digits that ship with scikit-learn (no download), split 80/20 into training
and held-out sets (stratified by class, fixed seed). A pixel is a count in ``0..16``, modelled as

.. math::
    z \sim \mathcal{N}(0, I_D), \qquad
    x_j \mid z \sim \operatorname{Binomial}\big(16,\ \operatorname{sigmoid}(g_\theta(z)_j)\big),
    \quad j = 1..64,

with an MLP decoder :math:`g_\theta`. Every encoder is an
:class:`~pyro_mogflow.AmortizedMixtureFlow` with the same MLP; they differ only in the
posterior's form:

* ``gaussian``: one component, no flow (the diagonal-Gaussian encoder of Kingma & Welling 2014);
* ``iaf``: one component and conditional affine autoregressive layers (IAF, Kingma et al. 2016);
* ``mixflow <estimator>``: ``K`` components under the same IAF layers, trained with each
  estimator (``stratified`` with :class:`~pyro_mogflow.StratifiedELBO`, the others with
  :class:`~pyro.infer.Trace_ELBO`).

Every encoder/decoder pair is trained for the same CPU-time budget (``--budget`` seconds of
process time, one thread, so other jobs on a shared machine slow the wall clock but barely the
budget), from the same seed, with Adam on minibatches under ``pyro.plate(subsample=...)``.

Held-out metrics (the decoder's log-likelihood in nats per image, averaged over held-out images,
with the standard error over images):

* ``IWAE``: :math:`\log \frac1S \sum_s p(x, z_s)/q(z_s \mid x)` with :math:`S` = ``--samples``
  (1000 by default) draws from the encoder, a lower bound on :math:`\log p(x)` that tightens as
  :math:`S` grows (Burda et al. 2016). Encoders trained with a relaxed estimator are evaluated
  with exact mixture draws, whose density is the one ``log_prob`` returns.
* ``ELBO``: the mean of the same :math:`S` log-weights.
* ``NMI comp``: normalized mutual information between each image's most probable component,
  :math:`\arg\max_k \pi_k(x)`, and its digit (mixture encoders only).
* ``NMI latent``: NMI between 10-means clusters of the posterior means and the digits.
* time per epoch (CPU seconds and wall seconds) and the epochs the budget bought.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn
from tqdm.auto import tqdm

from pyro_mogflow import AmortizedMixtureFlow, StratifiedELBO

from .runner import save_report

__all__ = [
    "EncoderSpec",
    "Decoder",
    "default_specs",
    "evaluate",
    "load_digits_counts",
    "main",
    "make_vae",
    "markdown",
    "train",
]

PIXELS = 64
MAX_COUNT = 16


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """One row of the table: the encoder's form and how it is trained.

    :param str label: row label.
    :param int num_components: ``K``.
    :param flow: a name in :data:`pyro_mogflow.flows.CONDITIONAL_FLOWS`, or ``None``.
    :param int num_flows: number of flow layers.
    :param str estimator: one of :data:`pyro_mogflow.ESTIMATORS`.
    """

    label: str
    num_components: int
    flow: str | None
    num_flows: int
    estimator: str


def default_specs(num_components: int, num_flows: int) -> list[EncoderSpec]:
    """Gaussian, IAF and the mixture flow with each estimator."""
    iaf = "affine_autoregressive"
    specs = [
        EncoderSpec("gaussian", 1, None, 0, "implicit"),
        EncoderSpec("iaf", 1, iaf, num_flows, "implicit"),
    ]
    for est in ("implicit", "stratified", "pathwise", "relaxed", "relaxed-nested"):
        specs.append(EncoderSpec(f"mixflow {est}", num_components, iaf, num_flows, est))
    return specs


def load_digits_counts(seed: int = 0, test_fraction: float = 0.2, dtype=torch.float32):
    """The digits as pixel counts, split into training and held-out sets.

    :return: ``(x_train, y_train, x_test, y_test)``; ``x`` of shape ``(N, 64)`` with integer
        counts in ``0..16`` (as ``dtype``), ``y`` the digit labels ``(N,)`` (int64).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data,
        digits.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    as_x = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


class Decoder(nn.Module):
    """MLP ``z -> logits`` of the 64 pixels' Binomial(16, p) laws.

    :param int latent_dim: ``D``. :param hidden_dims: hidden sizes.
    """

    def __init__(self, latent_dim: int, hidden_dims=(128, 128)):
        super().__init__()
        layers, width = [], latent_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.ELU()]
            width = h
        layers.append(nn.Linear(width, PIXELS))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` of shape ``(..., D)`` -> logits ``(..., 64)``."""
        return self.net(z)


def _likelihood(decoder: Decoder, z: torch.Tensor) -> dist.Distribution:
    return dist.Binomial(MAX_COUNT, logits=decoder(z)).to_event(1)


def _prior(latent_dim: int, like: torch.Tensor) -> dist.Distribution:
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return dist.Normal(zero, 1.0).expand([latent_dim]).to_event(1)


def make_vae(encoder: AmortizedMixtureFlow, decoder: Decoder, num_data: int):
    """The Pyro model and guide of the VAE.

    Both take ``(x, idx)``: ``x`` the full data set ``(N, 64)`` of counts, ``idx`` the indices
    of the minibatch, passed to ``pyro.plate(subsample=idx)``.
    """
    latent_dim = encoder.latent_dim

    def model(x, idx):
        pyro.module("decoder", decoder)
        with pyro.plate("data", num_data, subsample=idx):
            z = pyro.sample("z", _prior(latent_dim, x))
            pyro.sample("x", _likelihood(decoder, z), obs=x[idx])

    def guide(x, idx):
        pyro.module("encoder", encoder)
        with pyro.plate("data", num_data, subsample=idx):
            pyro.sample("z", encoder(x[idx] / MAX_COUNT))

    return model, guide


def train(
    spec: EncoderSpec,
    x: torch.Tensor,
    *,
    latent_dim: int,
    budget: float,
    seed: int = 0,
    batch_size: int = 100,
    lr: float = 2e-3,
    hidden_dims=(128, 128),
    max_epochs: int | None = None,
    progress: bool = True,
) -> dict:
    """Train one encoder/decoder pair for ``budget`` CPU seconds (or ``max_epochs``).

    :return: dict with ``encoder``, ``decoder``, ``losses`` (mean loss per image per epoch),
        ``epochs``, ``cpu_s`` and ``wall_s``.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    encoder = AmortizedMixtureFlow(
        PIXELS,
        latent_dim,
        spec.num_components,
        flow=spec.flow,
        num_flows=max(spec.num_flows, 1),
        hidden_dims=hidden_dims,
        estimator=spec.estimator,
    ).to(x.dtype)
    decoder = Decoder(latent_dim, hidden_dims).to(x.dtype)
    n = x.shape[0]
    model, guide = make_vae(encoder, decoder, n)
    loss = StratifiedELBO() if spec.estimator == "stratified" else Trace_ELBO()
    svi = SVI(model, guide, Adam({"lr": lr}), loss)
    losses = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    bar = tqdm(desc=spec.label, total=None, disable=not progress, leave=False, unit="epoch")
    while True:
        perm = torch.randperm(n)
        steps = [svi.step(x, perm[i : i + batch_size]) for i in range(0, n, batch_size)]
        # each step estimates the loss of the whole training set: average, then per image
        losses.append(sum(steps) / len(steps) / n)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.2f}")
        if max_epochs is not None and len(losses) >= max_epochs:
            break
        if max_epochs is None and time.process_time() - cpu0 >= budget:
            break
    bar.close()
    return {
        "encoder": encoder,
        "decoder": decoder,
        "losses": losses,
        "epochs": len(losses),
        "cpu_s": time.process_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
    }


@torch.no_grad()
def log_weights(
    encoder: AmortizedMixtureFlow,
    decoder: Decoder,
    x: torch.Tensor,
    num_samples: int,
    chunk: int = 250,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Importance log-weights :math:`\log p(x, z_s) - \log q(z_s \mid x)`, exact mixture draws.

    :param x: counts ``(B, 64)``. :return: ``(log_w, z_mean)`` of shapes ``(S, B)`` and
        ``(B, D)`` (the posterior mean estimated from the same draws).
    """
    q = encoder(x / MAX_COUNT, estimator="implicit")
    out, z_sum = [], 0.0
    prior = _prior(encoder.latent_dim, x)
    for start in range(0, num_samples, chunk):
        s = min(chunk, num_samples - start)
        z = q.sample((s,))
        log_q = q.log_prob(z)
        log_p = prior.log_prob(z) + _likelihood(decoder, z).log_prob(x)
        out.append(log_p - log_q)
        z_sum = z_sum + z.sum(0)
    return torch.cat(out, 0), z_sum / num_samples


def _nmi(a, b) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(a), np.asarray(b)))


def evaluate(
    result: dict, x: torch.Tensor, y: torch.Tensor, num_samples: int, seed: int = 0
) -> dict:
    """Held-out IWAE and ELBO (mean and SE over images, nats), NMI of components and latents."""
    from sklearn.cluster import KMeans

    encoder, decoder = result["encoder"], result["decoder"]
    torch.manual_seed(seed)
    log_w, z_mean = log_weights(encoder, decoder, x, num_samples)
    iwae = torch.logsumexp(log_w, 0) - math.log(num_samples)
    elbo = log_w.mean(0)
    # effective sample size of the importance weights, a check that S draws suffice
    w = torch.softmax(log_w, 0)
    ess = 1.0 / w.pow(2).sum(0)
    b = x.shape[0]
    out = {
        "iwae": float(iwae.mean()),
        "iwae_se": float(iwae.std() / math.sqrt(b)),
        "elbo": float(elbo.mean()),
        "elbo_se": float(elbo.std() / math.sqrt(b)),
        "gap": float((iwae - elbo).mean()),
        "ess_median": float(ess.median()),
        "nmi_latent": _nmi(
            KMeans(10, n_init=10, random_state=seed).fit_predict(z_mean.double().numpy()), y
        ),
        "nmi_components": None,
        "components_used": None,
        "iwae_per_image": iwae.tolist(),
    }
    with torch.no_grad():
        logits, locs, scales, _ = encoder.encode(x / MAX_COUNT)
    # the scale of each image's heaviest component: a collapsed encoder drives it to the floor
    heaviest = logits.argmax(-1)[:, None, None].expand(-1, 1, scales.shape[-1])
    out["scale_median"] = float(scales.gather(-2, heaviest).median())
    if encoder.num_components > 1:
        probs = encoder.component_probs(x / MAX_COUNT)
        top = probs.argmax(-1)
        out["nmi_components"] = _nmi(top, y)
        out["components_used"] = int(torch.unique(top).numel())
    return out


def _meta(args) -> dict:
    return {
        "machine": ", ".join(
            s for s in (platform.machine(), platform.processor(), f"{os.cpu_count()} cores") if s
        ),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }


def markdown(results: dict) -> str:
    """The markdown report of :func:`main`'s results."""
    meta, cfg = results["meta"], results["meta"]["config"]
    lines = [
        "# VAE on scikit-learn digits: amortized posteriors",
        "",
        f"Machine: {meta['machine']}; {meta['date']}; torch {meta['torch']}, pyro "
        f"{meta['pyro']}, {meta['threads']} thread. Command: `python -m benchmarks.vae"
        f"{' --quick' if cfg['quick'] else ''}`.",
        "",
        f"Data: {results['data']['train']} training / {results['data']['test']} held-out "
        f"digits (8x8, Binomial(16) pixels). Latent dim {cfg['latent_dim']}, encoder and decoder "
        f"MLPs {cfg['hidden']}, batch {cfg['batch_size']}, Adam lr {cfg['lr']}, "
        f"{cfg['budget']:g} CPU-s of training per encoder and seed, seeds "
        f"{cfg['seeds']}. Mixture flows: K = {cfg['components']}, {cfg['flows']} conditional "
        "IAF layers (the `iaf` row uses the same layers with K = 1).",
        "",
        f"Held-out log-likelihood in nats per image (higher is better): IWAE with S = "
        f"{cfg['samples']} draws, ELBO from the same draws; mean over seeds of the mean over "
        "held-out images, ± the SE over images (pooled over seeds). NMI: components vs digits "
        "(argmax of the mixture weights), and 10-means of the posterior means vs digits.",
        "",
        "| encoder | IWAE | ELBO | IWAE−ELBO | ESS | σ | NMI comp | comps used | "
        "NMI latent | epochs | CPU s/epoch | wall s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = max(r["iwae"] for r in results["rows"])
    for r in results["rows"]:
        iwae = f"{r['iwae']:.2f} ± {r['iwae_se']:.2f}"
        if r["iwae"] == best:
            iwae = f"**{iwae}**"
        comp = "—" if r["nmi_components"] is None else f"{r['nmi_components']:.3f}"
        used = "—" if r["components_used"] is None else f"{r['components_used']:.1f}"
        lines.append(
            f"| {r['label']} | {iwae} | {r['elbo']:.2f} ± {r['elbo_se']:.2f} | {r['gap']:.2f} | "
            f"{r['ess_median']:.0f} | {r['scale_median']:.2g} | {comp} | {used} | "
            f"{r['nmi_latent']:.3f} | "
            f"{r['epochs']:.0f} | {r['cpu_per_epoch']:.3f} | {r['wall_per_epoch']:.3f} |"
        )
    lines += [
        "",
        "`ESS`: median over images of the importance sampling effective sample size of the S "
        "draws (of S); a small ESS means the IWAE bound is still well below log p(x), so the "
        "IWAE column compares lower bounds, and an encoder that fits the posterior better also "
        "gets a tighter bound. `σ`: median scale of each image's heaviest component (the floor "
        "is 1e-4). `comps used`: distinct argmax components over the held-out images.",
        "",
        "## Goal",
        "",
        results["verdict"],
        "",
    ]
    relaxed = [r for r in results["rows"] if r["spec"]["estimator"].startswith("relaxed")]
    if relaxed:
        lines += [
            "## The relaxed estimators",
            "",
            "The Gumbel-softmax estimators optimise a biased objective: a relaxed draw is a "
            "soft blend of components and lies off them, where the exact mixture density that "
            "scores it is low, so the objective rewards narrow components and is unbounded as "
            "their scales shrink (see README). Their rows show what that does to a VAE: "
            + "; ".join(
                f"{r['label']}: σ {r['scale_median']:.2g}, IWAE {r['iwae']:.1f}" for r in relaxed
            )
            + ". They are evaluated on exact mixture draws, whose density is the one scored.",
            "",
        ]
    return "\n".join(lines)


def _verdict(rows: list[dict]) -> str:
    by = {r["label"]: r for r in rows}
    mix = [r for r in rows if r["label"].startswith("mixflow")]
    base = [by[k] for k in ("gaussian", "iaf") if k in by]
    if not mix or not base:
        return "Not enough rows to compare."
    best_mix = max(mix, key=lambda r: r["iwae"])
    best_base = max(base, key=lambda r: r["iwae"])
    paired = best_mix["_per_image"] - best_base["_per_image"]
    diff = float(paired.mean())
    se = float(paired.std(ddof=1) / math.sqrt(len(paired)))
    spread = max(best_mix["iwae_seed_spread"], best_base["iwae_seed_spread"])
    word = "beats" if diff > 0 else "does not beat"
    return (
        f"At equal training time the best mixture flow ({best_mix['label']}, IWAE "
        f"{best_mix['iwae']:.2f}) {word} the best baseline ({best_base['label']}, "
        f"{best_base['iwae']:.2f}): difference {diff:+.2f} nats per image, paired SE over "
        f"held-out images {se:.2f}; the larger of their seed-to-seed ranges is {spread:.2f} "
        "nats (training noise, which the SE over images does not include)."
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, for a smoke test")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--budget", type=float, default=40.0, help="CPU seconds per encoder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--latent-dim", dest="latent_dim", type=int, default=2)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--flows", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--samples", type=int, default=1000, help="IWAE draws per image")
    parser.add_argument("--only", default=None, help="comma-separated encoder labels")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.seeds, args.samples = 1.0, [0], 50
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = load_digits_counts(seed=0)
    specs = default_specs(args.components, args.flows)
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        specs = [s for s in specs if s.label in wanted]
    rows = []
    for spec in tqdm(specs, desc="encoders"):
        runs = []
        for seed in args.seeds:
            res = train(
                spec,
                x_tr,
                latent_dim=args.latent_dim,
                budget=args.budget,
                seed=seed,
                batch_size=args.batch_size,
                lr=args.lr,
                hidden_dims=tuple(args.hidden),
                max_epochs=2 if args.quick else None,
            )
            ev = evaluate(res, x_te, y_te, args.samples, seed=seed)
            ev.update(
                epochs=res["epochs"],
                cpu_per_epoch=res["cpu_s"] / res["epochs"],
                wall_per_epoch=res["wall_s"] / res["epochs"],
                final_train_loss=res["losses"][-1],
            )
            runs.append(ev)
        row = {"label": spec.label, "spec": dataclasses.asdict(spec), "runs": runs}
        for key in (
            "iwae",
            "elbo",
            "gap",
            "ess_median",
            "scale_median",
            "nmi_latent",
            "epochs",
            "cpu_per_epoch",
            "wall_per_epoch",
        ):
            row[key] = float(np.mean([r[key] for r in runs]))
        for key in ("iwae_se", "elbo_se"):  # pooled over seeds: SE of the mean of seed means
            row[key] = float(math.sqrt(sum(r[key] ** 2 for r in runs)) / len(runs))
        for key in ("nmi_components", "components_used"):
            vals = [r[key] for r in runs if r[key] is not None]
            row[key] = float(np.mean(vals)) if vals else None
        row["iwae_seed_spread"] = float(np.ptp([r["iwae"] for r in runs]))
        # per-image IWAE averaged over seeds, for paired comparisons (not written to the JSON)
        row["_per_image"] = np.mean([r.pop("iwae_per_image") for r in runs], axis=0)
        rows.append(row)
    results = {
        "meta": _meta(args),
        "data": {"train": int(x_tr.shape[0]), "test": int(x_te.shape[0])},
        "rows": rows,
    }
    results["verdict"] = _verdict(rows)
    for row in rows:
        del row["_per_image"]
    text = markdown(results)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = "vae_quick" if args.quick else "vae"
    save_report(results, text, args.out, name)
    return results


if __name__ == "__main__":
    main()
