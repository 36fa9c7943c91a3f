"""The reference networks of kinkprop.torch.models: shapes, sizes, and a step under a policy."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import kinkprop.torch as kpt  # noqa: E402
from kinkprop.torch import models  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def test_resnet18_has_resnet18_size():
    n = sum(p.numel() for p in models.resnet18(num_classes=1000).parameters())
    assert n == 11_689_512  # torchvision's resnet18
    assert sum(p.numel() for p in models.resnet18(10).parameters()) == 11_181_642


@pytest.mark.parametrize("build,shape", [
    (lambda bn: models.MLP(3 * 8 * 8, 10, (32, 16), batch_norm=bn), (4, 3, 8, 8)),
    (lambda bn: models.VGG(3, 10, (8, 16), batch_norm=bn), (4, 3, 16, 16)),
    (lambda bn: models.resnet18(10, batch_norm=bn, width=4), (2, 3, 16, 16)),
    (lambda bn: models.resnet18(10, batch_norm=bn, width=4, stem="cifar"), (2, 3, 8, 8)),
])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_models_train_under_policy_census_and_directional(build, shape, batch_norm):
    torch.manual_seed(0)
    model = build(batch_norm)
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    with kpt.census(model) as c, kpt.kink_policy("jax", relu=1.0, max_pool2d="split"):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    assert loss.shape == () and all(p.grad is not None for p in model.parameters())
    reading = c.read()
    assert reading.evaluated > 0
    assert any(s.primitive == "relu" for s in reading.sites.values())
    with kpt.kink_policy("directional", model=model) as scope:
        F.cross_entropy(model(x), y).backward()
    assert scope.report(warn=False).sites > 0


def test_resnet_stem_must_be_known():
    with pytest.raises(ValueError, match="stem"):
        models.resnet18(stem="tiny")
