"""The Flax InceptionV3 of FID (evaluation/inception.py) with random weights: shapes, the weights
file and its converter, the missing-file error, and (where torch is installed) equality with a
PyTorch transcription of pytorch-fid's network."""

import jax
import numpy as np
import pytest

from evaluation import convert_inception, inception

NUM_PARAMS = 23_850_960  # weights and biases (not BatchNorm statistics), fc 2048 -> 1008 included


def _random_variables(seed: int = 0) -> dict:
    """He-scaled random weights from the architecture's shapes (no jax init: seconds faster)."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(a.shape[:-1]))
            return (rng.standard_normal(a.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
        return (0.1 * rng.standard_normal(a.shape)).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(leaf, inception.abstract_variables())


@pytest.fixture(scope="module")
def variables():
    return _random_variables()


def test_architecture_shapes(variables):
    num = sum(np.size(p) for p in jax.tree.leaves(variables["params"]))
    assert num == NUM_PARAMS
    assert variables["params"]["fc"]["kernel"].shape == (2048, 1008)
    assert variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"].shape == (
        1, 1, 2048, 192)
    fn = jax.jit(inception.features_fn)
    rng = np.random.default_rng(1)
    for shape in [(2, 28, 28, 1), (2, 32, 32, 3)]:  # grey-scale is repeated; both resized to 299
        pool3, logits = fn(variables, rng.uniform(-1, 1, shape).astype(np.float32))
        assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
        assert np.all(np.isfinite(pool3)) and np.all(pool3 >= 0)  # mean of relus
        assert not np.allclose(pool3[0], pool3[1])


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_weights_file_round_trips(variables, tmp_path):
    path = str(tmp_path / inception.WEIGHTS_FILE)
    inception.save_npz(variables, path)
    with np.load(path, allow_pickle=False) as f:  # torch names and layouts inside
        assert f["fc.weight"].shape == (1008, 2048)
        assert f["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
        assert "Mixed_6b.branch7x7_2.bn.running_var" in f.files
    _assert_trees_equal(inception.load_variables(path), variables)


def test_converter_accepts_a_state_dict_with_pytorch_fid_key_names(variables, tmp_path):
    state_dict = inception.flax_to_torch(variables)
    state_dict["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)  # dropped, as in torch
    out = str(tmp_path / "converted.npz")
    convert_inception.convert(state_dict, out)
    _assert_trees_equal(inception.load_variables(out), variables)

    del state_dict["Mixed_5b.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match="Mixed_5b"):
        convert_inception.convert(state_dict, out)
    bad = inception.flax_to_torch(variables)
    bad["fc.weight"] = bad["fc.weight"][:1000]
    with pytest.raises(ValueError, match="wrong shapes"):
        convert_inception.convert(bad, out)


def test_missing_weights_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        inception.load_variables(str(tmp_path / "nope.npz"))
    message = str(e.value)
    for needle in (inception.SOURCE_FILE, inception.SOURCE_URL, "python -m evaluation."
                   "convert_inception", "inception_weights", "mnist_classifier"):
        assert needle in message


def _torch_fid_inception():
    """pytorch-fid's FID InceptionV3 (torchvision Inception3 with FIDInceptionA/C/E_1/E_2),
    transcribed layer by layer; the parameter names are those of the .pth."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, cin, pool):
            super().__init__()
            self.branch1x1 = Basic(cin, 64, kernel_size=1)
            self.branch5x5_1 = Basic(cin, 48, kernel_size=1)
            self.branch5x5_2 = Basic(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = Basic(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = Basic(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = Basic(96, 96, kernel_size=3, padding=1)
            self.branch_pool = Basic(cin, pool, kernel_size=1)

        def forward(self, x):
            return torch.cat([
                self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(avg(x))], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = Basic(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = Basic(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = Basic(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = Basic(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            return torch.cat([
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2)], 1)

    class C(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            self.branch1x1 = Basic(cin, 192, kernel_size=1)
            self.branch7x7_1 = Basic(cin, c7, kernel_size=1)
            self.branch7x7_2 = Basic(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = Basic(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = Basic(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = Basic(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = Basic(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = Basic(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = Basic(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = Basic(cin, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for i in range(1, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = Basic(cin, 192, kernel_size=1)
            self.branch3x3_2 = Basic(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = Basic(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = Basic(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = Basic(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = Basic(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b7 = x
            for i in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                              F.max_pool2d(x, 3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, pool):
            super().__init__()
            self.pool = pool
            self.branch1x1 = Basic(cin, 320, kernel_size=1)
            self.branch3x3_1 = Basic(cin, 384, kernel_size=1)
            self.branch3x3_2a = Basic(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = Basic(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = Basic(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = Basic(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = Basic(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = Basic(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = Basic(cin, 192, kernel_size=1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pooled = avg(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

    class FIDInception(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = Basic(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = Basic(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = Basic(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = Basic(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = Basic(80, 192, kernel_size=3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
            self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
            self.Mixed_7a = D(768)
            self.Mixed_7b, self.Mixed_7c = E(1280, "avg"), E(2048, "max")
            self.fc = nn.Linear(2048, 1008)

        def forward(self, x):  # x [B, 3, H, W] in [-1, 1], as pytorch-fid after normalisation
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return pool3, self.fc(pool3)

    return FIDInception


def test_flax_inception_equals_a_torch_transcription(variables):
    """Random torch weights -> converter -> Flax: same pool3 and logits (float32 round-off)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = _torch_fid_inception()().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    state_dict = net.state_dict()
    flax_vars = inception.torch_to_flax(convert_inception.state_dict_to_arrays(state_dict))
    images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        pool3_t, logits_t = net(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    pool3, logits = jax.jit(inception.features_fn)(flax_vars, images)
    np.testing.assert_allclose(pool3, pool3_t.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(logits, logits_t.numpy(), rtol=1e-3, atol=1e-3)
