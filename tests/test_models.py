import pytest
import torch
import torch.nn.functional as F

from cifarlab import CifarlabError
from cifarlab.losses import classifier_loss, l2_penalty
from cifarlab.models import MaxPoolSame, convnet, decayed_weights


def test_convnet_shapes_and_parameter_count():
    net = convnet()
    x = torch.randn(4, 3, 32, 32)
    assert net(x).shape == (4, 10)
    feats = net.features(x, ["flatten", "fc1", "fc2"])
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "flatten": (4, 4096), "fc1": (4, 384), "fc2": (4, 192)}
    expected = (5 * 5 * 3 * 64 + 64) + (5 * 5 * 64 * 64 + 64) + (4096 * 384 + 384) \
        + (384 * 192 + 192) + (192 * 10 + 10)
    assert sum(p.numel() for p in net.parameters()) == expected == 1_756_426


def test_features_match_forward_and_unknown_layer_is_named():
    net = convnet().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = net.features(x, ["fc2"])
    assert torch.allclose(net.stages["logits"](feats["fc2"]), net(x))
    with pytest.raises(CifarlabError, match="fc9.*flatten, fc1, fc2, logits"):
        net.features(x, ["fc9"])


def test_seed_init_is_normal_0_001_with_zero_bias():
    torch.manual_seed(0)
    w = convnet().stages["fc1"].linear
    assert abs(w.weight.std().item() - 0.001) < 5e-5
    assert w.bias.abs().max().item() == 0.0
    xav = convnet(init="xavier").stages["fc1"].linear.weight
    assert xav.std().item() > 0.01
    with pytest.raises(CifarlabError):
        convnet(init="bogus")


def test_maxpool_same_equals_tensorflow_same_padding():
    # TF 'SAME' for a 3x3/2 pool on 32x32: output 16x16, padding only right/bottom (with -inf).
    x = torch.randn(2, 5, 32, 32)
    tf_same = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
    out = MaxPoolSame()(x)
    assert out.shape == (2, 5, 16, 16)
    assert torch.equal(out, tf_same)


def test_weight_decay_term_is_half_sum_of_squares_of_fc1_fc2():
    net = convnet()
    with torch.no_grad():
        net.stages["fc1"].linear.weight.fill_(0.5)
        net.stages["fc2"].linear.weight.fill_(-2.0)
    by_hand = 0.01 * (4096 * 384 * 0.25 + 384 * 192 * 4.0) / 2
    assert l2_penalty(decayed_weights(net), 0.01).item() == pytest.approx(by_hand, rel=1e-6)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = F.cross_entropy(logits, labels)
    total = classifier_loss(logits, labels, decayed_weights(net), 0.01)
    assert total.item() == pytest.approx(ce.item() + by_hand, rel=1e-6)
    assert classifier_loss(logits, labels, decayed_weights(net), 0.0).item() == pytest.approx(ce.item())


def test_dropout_is_a_drop_probability_and_off_in_eval():
    net = convnet(dropout=0.2)
    assert net.stages["fc1"].dropout.p == 0.2 and net.stages["fc2"].dropout.p == 0.2
    net.eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(net(x), net(x))


def test_pool_then_relu_equals_the_reports_relu_then_pool_with_gradients():
    torch.manual_seed(0)
    net = convnet(init="xavier")
    trunk = net.stages["flatten"]
    x = torch.randn(3, 3, 32, 32)

    def textbook(x):
        h = F.max_pool2d(F.pad(F.relu(trunk.conv1(x)), (0, 1, 0, 1), value=float("-inf")), 3, 2)
        h = F.max_pool2d(F.pad(F.relu(trunk.conv2(h)), (0, 1, 0, 1), value=float("-inf")), 3, 2)
        return h.flatten(1)

    ours, ref = trunk(x), textbook(x)
    assert torch.allclose(ours, ref)
    g_ours = torch.autograd.grad(ours.square().sum(), trunk.conv1.weight)[0]
    g_ref = torch.autograd.grad(ref.square().sum(), trunk.conv1.weight)[0]
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


def test_counts_in_messages_agree_with_their_number():
    from cifarlab import counted

    assert [counted(1, "step"), counted(2, "step"), counted(15000, "step", ","), counted(0, "run")] == \
        ["1 step", "2 steps", "15,000 steps", "0 runs"]
    assert counted(1, "pass") == "1 pass" and counted(3, "pass") == "3 passes"
