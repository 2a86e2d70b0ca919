"""DP-DyLoRA (training.privacy, training.federated_dylora, train_llm --dp_*): the mechanism's invariants (clipped norms,
noise std σC/denominator, accountant monotonicity), DP-FedAvg == FedAvg at σ=0/C=inf, untouched rank slices,
per-example gradients == one-by-one gradients, exact resume, and bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import lora_diffusion as ld
from training import federated_dylora as fd
from training import privacy, train_llm
from training.config import ConfigError
from training.llm_data import char_tokenizer, collate, load_examples

from .conftest import FIXTURES
from .test_llm_train import make_tiny_folder, tiny_model

TRAIN = FIXTURES / "llm_shout_train.jsonl"
EVAL = FIXTURES / "llm_shout_eval.jsonl"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "llama")


# --- the mechanism ---
@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 3.0])
def test_clipped_update_norm_is_at_most_C_and_small_updates_pass_unchanged(max_norm):
    gen = torch.Generator().manual_seed(0)
    for scale in [1e-6, 1e-2, 1.0, 1e3]:
        u = {"a": torch.randn(4, 7, generator=gen) * scale, "b": torch.randn(9, generator=gen) * scale}
        c = privacy.clip_update(u, max_norm)
        n, nc = float(privacy.global_norm(u.values())), float(privacy.global_norm(c.values()))
        assert nc <= max_norm * (1 + 1e-6)
        if n <= max_norm:
            assert all(torch.equal(u[k], c[k]) for k in u)
        else:
            assert nc == pytest.approx(max_norm, rel=1e-5)
            assert all(torch.allclose(c[k] * n / nc, u[k], rtol=1e-5) for k in u)  # direction kept


def test_aggregate_clips_each_client_then_adds_noise_of_std_sigma_C_over_denominator():
    sigma, C, denom = 1.3, 0.7, 20.0
    gen = torch.Generator().manual_seed(1)
    updates = [{"A": torch.randn(100, 1000, generator=gen) * s} for s in (1e-4, 1.0, 5.0)]  # norms ~0.03, 316, 1581
    mean, norms = fd.aggregate(updates, C, sigma, denom, torch.Generator().manual_seed(2))
    clipped = sum(privacy.clip_update(u, C)["A"].double() for u in updates) / denom
    noise = mean["A"] - clipped
    assert norms == pytest.approx([float(u["A"].norm()) for u in updates], rel=1e-6)
    # 1e5 draws: the std's relative standard error is 1/sqrt(2·1e5) = 0.22 %; 1 % is 4.5 standard errors
    assert float(noise.std()) == pytest.approx(sigma * C / denom, rel=0.01)
    assert abs(float(noise.mean())) < 5 * sigma * C / denom / math.sqrt(noise.numel())
    no_noise, _ = fd.aggregate(updates, C, 0.0, denom, torch.Generator().manual_seed(2))
    assert torch.allclose(no_noise["A"], clipped)


def test_aggregate_refuses_updates_of_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        fd.aggregate([{"A": torch.zeros(2, 3)}, {"A": torch.zeros(3, 3)}], 1.0, 1.0, 2.0, torch.Generator())


def test_accountant_epsilon_grows_with_rounds_and_falls_with_sigma():
    q, delta = 0.1, 1e-5
    by_rounds = [privacy.epsilon(1.0, q, t, delta) for t in (1, 10, 100, 1000)]
    by_sigma = [privacy.epsilon(s, q, 100, delta) for s in (0.6, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:])), by_rounds
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:])), by_sigma
    assert privacy.epsilon(0.0, q, 10, delta) == math.inf and privacy.epsilon(1.0, q, 0, delta) == 0.0


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.1, 100), (0.7, 0.5, 5), (3.0, 0.01, 1000)])
def test_epsilon_matches_opacus_accountant_and_google_dp_accounting(sigma, q, steps):
    """Opacus' RDP accountant as a stateful object, Google's independent RDP implementation (same orders) within
    1 %, and its PLD accountant (tighter) at or below: RDP is an upper bound."""
    import dp_accounting
    from dp_accounting import pld, rdp
    from opacus.accountants import RDPAccountant

    ours = privacy.epsilon(sigma, q, steps, 1e-5)
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    google = rdp.RdpAccountant(RDPAccountant.DEFAULT_ALPHAS).compose(event, steps).get_epsilon(1e-5)
    assert ours == pytest.approx(google, rel=0.01)
    assert pld.PLDAccountant().compose(event, steps).get_epsilon(1e-5) <= ours


def test_target_epsilon_gives_a_sigma_that_meets_it_or_a_clear_error():
    q, steps, delta = 0.05, 200, 1e-5
    sigma = privacy.noise_for_target(2.0, q, steps, delta)
    eps = privacy.epsilon(sigma, q, steps, delta)
    assert 2.0 * 0.98 <= eps <= 2.0
    floor = privacy.smallest_epsilon(q, steps, delta)
    with pytest.raises(ConfigError, match=r"--target_epsilon 0\.01: unreachable in 200 steps.*expected --target_epsilon >"):
        privacy.noise_for_target(0.01, q, steps, delta)
    assert 0.01 < floor < 1


# --- federated rounds ---
def fed_config(folder: Path, out: Path, **kw) -> fd.FedConfig:
    cfg = fd.FedConfig()
    cfg.model.model, cfg.data.train_file, cfg.data.eval_file = str(folder), str(TRAIN), str(EVAL)
    cfg.data.max_length, cfg.data.num_clients, cfg.adapter.rank = 64, kw.pop("num_clients", 8), 4
    cfg.checkpoint.output_dir, cfg.run.progress = str(out), False
    for k, v in kw.items():
        sec = next(s for s in ("fed", "dp", "adapter", "data", "run", "checkpoint") if hasattr(getattr(cfg, s), k))
        setattr(getattr(cfg, sec), k, v)
    return cfg


def reference_fedavg_round(fed: fd.Federation, t: int) -> dict[str, torch.Tensor]:
    """Plain FedAvg written out: every client trains a copy of the model by SGD, the server averages the deltas."""
    cfg, start = fed.cfg, {k: p.detach().clone() for k, (p, _) in fed.params.items()}
    deltas = []
    for k in range(len(fed.shards)):
        m = copy.deepcopy(fed.model)
        ld.TrainingHooks(m).set_step(t)
        params = [p for n, p in m.named_parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.fed.client_lr)
        for idx in fd.client_batches(fed.shards[k], cfg.fed.local_steps, cfg.data.local_batch_size, cfg.run.seed, t, k):
            m(**collate([fed.examples[i] for i in idx], fed.pad_id)).loss.backward()
            opt.step()
            opt.zero_grad()
        deltas.append({n: p.detach() - start[n] for n, p in m.named_parameters() if p.requires_grad})
    return {n: start[n] + sum(d[n] for d in deltas) / len(deltas) for n in start}


@pytest.mark.parametrize("num_clients,local_steps", [(1, 1), (5, 2)])
def test_sigma_0_and_C_inf_is_plain_fedavg(folder, tmp_path, num_clients, local_steps):
    """(1, 1): one client, one local step, q = 1: exactly one DyLoRA SGD step at the round's rank."""
    cfg = fed_config(folder, tmp_path, num_clients=num_clients, local_steps=local_steps, client_rate=1.0,
                     dp_noise_multiplier=0.0, dp_max_grad_norm=math.inf, client_lr=0.3)
    fed, _ = fd.build(cfg)
    for t in (1, 2):
        expected = reference_fedavg_round(fed, t)
        log = fd.run_round(fed, t)
        assert log["clients"] == num_clients
        for n, (p, _) in fed.params.items():
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, (p, _) in fed.params.items() if n.endswith("lora_B"))


@pytest.mark.parametrize("mode", ["all", "frozen"])
def test_noisy_round_touches_only_the_sent_rank_slices(folder, tmp_path, mode):
    cfg = fed_config(folder, tmp_path, client_rate=0.5, dp_noise_multiplier=1.0, dp_max_grad_norm=0.1, mode=mode)
    fed, _ = fd.build(cfg)
    t = next(t for t in range(1, 50) if 1 < fd.round_rank(cfg.run.seed, t, 4, 1) < 4)
    b = fd.round_rank(cfg.run.seed, t, 4, 1)
    lo, hi = fd.sent_slice(b, 1, mode)
    before = {k: p.detach().clone() for k, (p, _) in fed.params.items()}
    fd.run_round(fed, t)
    for k, (p, ax) in fed.params.items():
        inside = [i for i in range(4) if lo <= i < hi]
        outside = [i for i in range(4) if not lo <= i < hi]
        assert torch.equal(p.detach().index_select(ax, torch.tensor(outside)),
                           before[k].index_select(ax, torch.tensor(outside))), (k, b, mode)
        assert not torch.equal(p.detach().index_select(ax, torch.tensor(inside)),
                               before[k].index_select(ax, torch.tensor(inside)))


def test_the_adapters_train_at_the_servers_rank_of_the_round(folder, tmp_path):
    from lora_diffusion.core.layer import AdaptedLayer

    fed, _ = fd.build(fed_config(folder, tmp_path, rank=4))
    fed.model.train()
    layers = [m for m in fed.model.modules() if isinstance(m, AdaptedLayer)]
    seen = set()
    for t in range(1, 30):
        fed.hooks.set_step(t)
        b = fd.round_rank(0, t, 4, 1)
        seen.add(b)
        assert {m.adapters["default"].rank_for(m._holder.current()) for m in layers} == {b}
    assert seen == {1, 2, 3, 4}


def test_every_client_update_of_a_round_is_clipped_to_C(folder, tmp_path, monkeypatch):
    seen = []
    real = fd.aggregate

    def spy(updates, max_norm, sigma, denom, gen):
        seen.append({tuple(v.shape for v in u.values()) for u in updates})  # one shape per round
        out, norms = real(updates, max_norm, sigma, denom, gen)
        seen.append([float(privacy.global_norm(privacy.clip_update(u, max_norm).values())) for u in updates])
        return out, norms

    monkeypatch.setattr(fd, "aggregate", spy)
    cfg = fed_config(folder, tmp_path, client_rate=0.6, dp_noise_multiplier=0.5, dp_max_grad_norm=1e-3)
    fed, _ = fd.build(cfg)
    logs = [fd.run_round(fed, t) for t in (1, 2, 3)]
    assert all(x["clipped_fraction"] == 1.0 for x in logs if x["clients"])  # tiny C: every update is clipped
    for shapes, norms in zip(seen[::2], seen[1::2]):
        assert len(shapes) == 1 and all(n <= 1e-3 * (1 + 1e-6) for n in norms)


def cli(folder: Path, out: Path, *extra: str) -> dict:
    return fd.main(["--model", str(folder), "--train_file", str(TRAIN), "--eval_file", str(EVAL), "--output_dir",
                    str(out), "--max_length", "64", "--num_clients", "16", "--rank", "4", "--client_rate", "0.5",
                    "--no-progress", *extra])


def test_federated_cli_reports_epsilon_per_round_resumes_exactly_and_never_overwrites(folder, tmp_path):
    common = ["--dp_noise_multiplier", "0.8", "--dp_max_grad_norm", "0.5", "--checkpoint_rounds", "2",
              "--eval_rounds", "2"]
    m = cli(folder, tmp_path / "straight", "--rounds", "4", *common)
    eps = [h["epsilon"] for h in m["history"]]
    assert eps == [pytest.approx(privacy.epsilon(0.8, 0.5, t, 1e-5)) for t in (1, 2, 3, 4)]
    assert m["epsilon"] == eps[-1] and m["eval_loss"] < m["eval_loss_before"]
    assert set(m["eval_loss_by_rank"]) == {1, 2, 4}
    saved = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert saved["rounds"] == 4 and saved["epsilon"] == pytest.approx(eps[-1])
    cli(folder, tmp_path / "cut", "--rounds", "2", *common)
    cli(folder, tmp_path / "cut", "--rounds", "4", "--resume_from_checkpoint", "latest", *common)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "adapter.safetensors"), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = (tmp_path / "straight" / "adapter.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli(folder, tmp_path / "straight", "--rounds", "1", *common)
    assert (tmp_path / "straight" / "adapter.safetensors").read_bytes() == before


def test_a_stop_signal_saves_the_round_and_the_resumed_run_is_the_uninterrupted_one(folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from training.loop import EXIT_STOPPED, StopSignals

    class StopAfterFirstRound(StopSignals):
        requested = property(lambda self: True, lambda self, v: None)  # as if SIGTERM arrived during round 1

    common = ["--rounds", "3", "--dp_noise_multiplier", "0.8", "--checkpoint_rounds", "0", "--eval_rounds", "3"]
    cli(folder, tmp_path / "straight", *common)
    with monkeypatch.context() as mp:
        mp.setattr(fd, "StopSignals", StopAfterFirstRound)
        with pytest.raises(SystemExit) as stopped:
            cli(folder, tmp_path / "cut", *common)
    assert stopped.value.code == EXIT_STOPPED and sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == [
        "checkpoint-1"]
    assert not (tmp_path / "cut" / "adapter.safetensors").exists()  # no final outputs from an unfinished run
    cli(folder, tmp_path / "cut", *common, "--resume_from_checkpoint", "latest")
    a, b = load_file(tmp_path / "straight" / "adapter.safetensors"), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_federated_target_epsilon_is_met(folder, tmp_path):
    m = cli(folder, tmp_path / "t", "--rounds", "3", "--target_epsilon", "5", "--eval_rounds", "3",
            "--checkpoint_rounds", "0")
    assert 4.9 <= m["epsilon"] <= 5.0 and m["noise_multiplier"] > 0


@pytest.mark.parametrize("args,match", [
    (["--dp_max_grad_norm", "0"], r"--dp_max_grad_norm: expected a clipping bound C > 0"),
    (["--dp_max_grad_norm", "-1"], r"--dp_max_grad_norm: expected a clipping bound C > 0"),
    (["--client_rate", "0"], r"--client_rate: expected a sampling rate q in \(0, 1\]"),
    (["--client_rate", "1.5"], r"--client_rate: expected a sampling rate q in \(0, 1\]"),
    (["--target_epsilon", "0.01"], r"--target_epsilon 0\.01: unreachable in 5 rounds .* expected --target_epsilon > "),
    (["--dp_noise_multiplier", "1", "--dp_max_grad_norm", "inf"], r"--dp_max_grad_norm inf with"),
    (["--dp_delta", "0"], r"--dp_delta: expected 0 < δ < 1"),
])
def test_federated_bad_input_is_one_clear_error(folder, tmp_path, args, match):
    with pytest.raises(ConfigError, match=match):
        cli(folder, tmp_path / "bad", "--rounds", "5", *args)
    assert not (tmp_path / "bad" / "adapter.safetensors").exists()


def test_more_clients_than_records_is_refused(folder, tmp_path):
    with pytest.raises(ConfigError, match="--num_clients 1000: the training set has only"):
        fd.main(["--model", str(folder), "--train_file", str(TRAIN), "--output_dir", str(tmp_path), "--num_clients",
                 "1000", "--no-progress"])


# --- record-level DP-SGD ---
@pytest.mark.parametrize("variant", ["lora", "dylora", "dora"])
def test_per_example_gradients_equal_one_by_one_gradients(variant):
    tok = char_tokenizer()
    model = tiny_model("llama")
    ld.add_adapter(model, ld.AdapterSpec(variant=variant, rank=4, targets="llm", seed=1))
    model.train()
    ld.TrainingHooks(model).set_step(3)  # DyLoRA: a truncated rank for this step
    with torch.no_grad():  # B = 0 at init would make A's gradients 0: give B values
        for n, p in ld.adapter_parameters(model):
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    examples = load_examples(TRAIN, tok, 64)[:5]
    batch = collate(examples, tok.pad_token_id)  # right-padded, different lengths
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads, losses = privacy.per_example_grads(model, params, batch)
    for i, e in enumerate(examples):
        one = collate([e], tok.pad_token_id)  # alone: no padding, with its attention mask
        loss = model(**one).loss
        ref = torch.autograd.grad(loss, list(params.values()))
        assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-5)
        for (n, g), r in zip(grads.items(), ref):
            torch.testing.assert_close(g[i], r, rtol=1e-4, atol=1e-6, msg=n)


def test_dpsgd_gradient_is_clipped_sum_plus_noise_over_expected_batch():
    tok = char_tokenizer()
    model = tiny_model("llama")
    ld.add_adapter(model, ld.AdapterSpec(variant="lora", rank=4, targets="llm", seed=1))
    model.train()
    batch = collate(load_examples(TRAIN, tok, 64)[:4], tok.pad_token_id)
    mech = privacy.DPSGD(model, sigma=0.7, max_norm=0.05, sample_rate=0.1, n_examples=60, seed=3)
    loss = mech.loss(5, batch)
    loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads, losses = privacy.per_example_grads(model, params, batch)
    expected, norms = privacy.privatize(grads, 0.05, 0.7, 6.0, privacy.seeded(3, 7, 5))
    assert float(loss) == pytest.approx(float(losses.mean()), rel=1e-6)
    assert (norms > 0.05).all()  # the bound is active
    for n, p in params.items():
        torch.testing.assert_close(p.grad, expected[n].float(), rtol=1e-4, atol=1e-7)


def llm_cli(folder: Path, out: Path, *extra: str) -> dict:
    return train_llm.main(["--model", str(folder), "--train_file", str(TRAIN), "--eval_file", str(EVAL),
                           "--output_dir", str(out), "--max_length", "64", "--lr", "1e-2", "--train_batch_size", "8",
                           "--variant", "dylora", "--rank", "4", "--no-progress", "--report_to", "none", *extra])


def test_train_llm_dp_sgd_reports_epsilon_and_resumes_exactly(folder, tmp_path):
    common = ["--dp_noise_multiplier", "1.0", "--dp_max_grad_norm", "1.0", "--checkpointing_steps", "3"]
    m = llm_cli(folder, tmp_path / "straight", "--max_train_steps", "6", *common)
    q = 8 / 64
    assert m["dp"]["epsilon"] == pytest.approx(privacy.epsilon(1.0, q, 6, 1e-5)) and m["dp"]["sample_rate"] == q
    llm_cli(folder, tmp_path / "cut", "--max_train_steps", "3", *common)
    llm_cli(folder, tmp_path / "cut", "--max_train_steps", "6", "--resume_from_checkpoint", "latest", *common)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "adapter.safetensors"), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    t = llm_cli(folder, tmp_path / "target", "--max_train_steps", "4", "--target_epsilon", "8", "--checkpointing_steps",
                "0")
    assert 7.9 <= t["dp"]["epsilon"] <= 8.0


@pytest.mark.parametrize("args,match", [
    (["--dp_noise_multiplier", "1", "--dp_max_grad_norm", "0"], r"--dp_max_grad_norm: expected a clipping bound C > 0"),
    (["--target_epsilon", "0.01"], r"--target_epsilon 0\.01: unreachable in 5 steps"),
    (["--target_epsilon", "-1"], r"--target_epsilon: expected a finite ε > 0"),
    (["--dp_noise_multiplier", "1", "--gradient_accumulation_steps", "2"], r"--gradient_accumulation_steps 1"),
    (["--dp_noise_multiplier", "1", "--target_epsilon", "3"], r"give one of them"),
    (["--dp_noise_multiplier", "1", "--variant", "loradrop"], r"--variant loradrop \(its importance stage"),
])
def test_train_llm_dp_bad_input_is_one_clear_error(folder, tmp_path, args, match):
    with pytest.raises(ConfigError, match=match):
        llm_cli(folder, tmp_path / "bad", "--max_train_steps", "5", *args)
    assert not (tmp_path / "bad" / "adapter.safetensors").exists()


def test_metrics_of_a_non_private_run_are_strict_json(folder, tmp_path):
    """ε = inf without noise: metrics.json says null (Infinity is not JSON: browsers and jq refuse the file)."""
    m = cli(folder, tmp_path / "plain", "--rounds", "1", "--dp_noise_multiplier", "0", "--dp_max_grad_norm", "inf")
    assert m["epsilon"] == math.inf

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in metrics.json")

    saved = json.loads((tmp_path / "plain" / "metrics.json").read_text(), parse_constant=refuse)
    assert saved["epsilon"] is None and all(h["epsilon"] is None for h in saved["history"])
