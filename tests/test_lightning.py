"""fr.TorchOptimizer under Lightning's automatic optimization: max_steps stops the fit, the
optimizer state is in Lightning's checkpoints and a resumed fit equals an uninterrupted
one bit for bit, and precision="64-true" trains the converted float64 params."""

from __future__ import annotations

import pytest
import torch

import functorch_reg as fr

lightning = pytest.importorskip("lightning")


class Regressor(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 1),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        params = dict(self.net.named_parameters())
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        return loss + 1e-3 * fr.penalties.l1(params, where=fr.select.weights())

    def configure_optimizers(self):
        # Built here, after Lightning converted the module (precision, device).
        return fr.TorchOptimizer(
            self.net.named_parameters(), fr.adamw(lr=1e-2, mask=fr.select.weights())
        )


def loader(batch_size=32):  # two steps an epoch
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def trainer(max_steps, tmp_path, **kwargs):
    return lightning.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        **kwargs,
    )  # fmt: skip


@pytest.mark.slow
def test_max_steps_stops_and_a_checkpoint_resumes_the_optimizer_exactly(tmp_path):
    run = trainer(3, tmp_path)
    run.fit(Regressor(), loader())
    assert run.global_step == 3  # max_steps stopped the fit in its second epoch

    # One batch an epoch, so that which batch a resumed epoch starts at does not matter.
    straight = Regressor()
    trainer(4, tmp_path).fit(straight, loader(64))

    first = Regressor()
    part = trainer(2, tmp_path)
    part.fit(first, loader(64))
    part.save_checkpoint(tmp_path / "epoch1.ckpt")
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)["optimizer_states"][0]
    assert sorted(saved["state"][0]) == ["beta_powers", "exp_avg", "exp_avg_sq", "skipped"]

    resumed = Regressor()  # fresh weights and a fresh optimizer: both come from the checkpoint
    rest = trainer(4, tmp_path)
    rest.fit(resumed, loader(64), ckpt_path=tmp_path / "epoch1.ckpt")
    assert rest.global_step == 4
    for (name, p), q in zip(
        resumed.state_dict().items(), straight.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name


def test_precision_64_true_trains_the_converted_params(tmp_path):
    module = Regressor()
    before = module.net[0].weight.detach().clone()
    trainer(2, tmp_path, precision="64-true").fit(module, loader())
    optimizer = module.trainer.optimizers[0]
    weight = module.net[0].weight
    assert weight.dtype == torch.float64
    assert any(p is weight for group in optimizer.param_groups for p in group["params"])
    assert optimizer.state[weight]["exp_avg"].dtype == torch.float64
    assert not torch.equal(weight.float(), before)
