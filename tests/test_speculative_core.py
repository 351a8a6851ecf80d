"""The draft/verify core: per-row commits and rollback through the guided stepper on a real RasterAR cache (other
rows untouched), dropping finished images, verification of multi-code units, the measured statistics against their
closed forms, and LANTERN's relaxed verifier."""

import pytest
import torch
from vgen.models.raster_ar import RasterAR
from vgen.samplers.lantern import LanternVerifier, neighbour_table
from vgen.samplers.next_scale import TokenSampling
from vgen.samplers.speculative_core import (
    ExactVerifier,
    GuidedStepper,
    guidance_weights_tensor,
    verify_drafts,
)
from vgen.samplers.guidance import ConstantCFG
from vgen.samplers.speculative_exact import generate_speculative_exact

from speculative_mocks import TableModel


def tiny(seed=0, **kw) -> RasterAR:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=16, grid_size=4, depth=2, embed_dim=16, num_heads=2, ffn_hidden_dim=16, num_classes=3,
               token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    model = RasterAR(**{**cfg, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def stepper(model, B, w=2.0):
    s = GuidedStepper(model, guidance_weights_tensor(ConstantCFG(), w, model.sequence_length), TokenSampling(), B)
    first = s.prefill(model.class_condition(torch.arange(B) % 3))
    return s, first


def committed_kv(s: GuidedStepper, row: int):
    """Keys of every layer for the committed positions of model row ``row``."""
    cache = s.state.cache
    return cache.k[:, row, :, : int(cache.lengths_B[row])].clone()


def test_per_row_rollback_leaves_other_rows_untouched():
    model = tiny()
    units = torch.randint(0, 16, (3, 5, 1), generator=torch.Generator().manual_seed(0))
    s, _ = stepper(model, 3)
    s.decode(units[:, :4])
    s.commit(torch.tensor([4, 2, 3]))  # per-row acceptance lengths, CFG rows alike
    assert s.units_B.tolist() == [4, 2, 3]
    assert s.state.units_B.tolist() == [4, 2, 3, 4, 2, 3]
    before = {r: committed_kv(s, r) for r in range(6)}
    s.truncate_units(torch.tensor([4, 1, 3]))  # roll back one unit of image 1 only
    assert s.units_B.tolist() == [4, 1, 3]
    for r in (0, 2, 3, 5):
        assert torch.equal(committed_kv(s, r), before[r])
    assert torch.equal(committed_kv(s, 1), before[1][:, :, : int(s.state.cache.lengths_B[1])])
    # the next pass continues every row at its own length and matches a fresh image-by-image run
    nxt = units[:, 4:5]
    probs = s.decode(nxt)
    for b, n in enumerate([4, 1, 3]):
        ref, _ = stepper(tiny(), 3)
        ref.decode(units[:, :n])
        ref.commit()
        expected = ref.decode(nxt)[b]
        assert torch.allclose(probs[b], expected, atol=1e-5), b


def test_dropping_finished_images_keeps_the_rest_and_their_guidance_rows():
    model = tiny()
    units = torch.randint(0, 16, (3, 3, 1), generator=torch.Generator().manual_seed(1))
    s, _ = stepper(model, 3)
    s.decode(units[:, :2])
    s.commit(torch.tensor([2, 1, 2]))
    s.keep_images(torch.tensor([True, False, True]))
    assert s.images_B.tolist() == [0, 2] and s.state.units_B.tolist() == [2, 2, 2, 2]
    probs = s.decode(units[[0, 2], 2:3])
    ref, _ = stepper(tiny(), 3)
    ref.decode(units[:, :2])
    ref.commit()
    expected = ref.decode(units[:, 2:3])[[0, 2]]
    assert torch.allclose(probs, expected, atol=1e-5)
    assert s.forwards_B.tolist() == [3, 2, 3]


def test_guidance_rows_go_once_no_position_ahead_is_guided():
    model = tiny()
    weights = torch.tensor([3.0, 3.0] + [1.0] * 14, dtype=torch.float64)
    s = GuidedStepper(model, weights, TokenSampling(), 2)
    s.prefill(model.class_condition(torch.tensor([0, 1])))
    s.decode(torch.zeros(2, 1, 1, dtype=torch.long))
    s.commit()
    s.drop_guidance_when_over()
    assert s.guided and s.state.units_B.numel() == 4  # one unit committed: position 1 is still to come
    s.decode(torch.zeros(2, 1, 1, dtype=torch.long))
    s.commit()
    s.drop_guidance_when_over()
    assert not s.guided and s.state.units_B.numel() == 2


def test_verification_of_multi_code_units():
    V = 3
    p = torch.tensor([0.6, 0.3, 0.1]).expand(1, 3, 2, V).clone()  # 2 drafted units + bonus, 2 codes each
    q = torch.tensor([0.2, 0.2, 0.6]).expand(1, 2, 2, V).clone()
    drafts = torch.tensor([[[0, 1], [2, 0]]])
    # unit 0: both codes have p / q >= 1 -> accepted; unit 1: code 0 (p/q = 1/6) rejected by u = 0.9, code 1 accepted
    u_accept = torch.tensor([[[0.99, 0.99], [0.9, 0.5]]])
    ver = verify_drafts(p, q, drafts, u_accept, torch.tensor([[0.0, 0.0]]), ExactVerifier())
    assert ver.accepted_B.tolist() == [1]
    assert ver.next_Bk[0, 1] == 0  # the accepted code of the corrected unit stays
    assert ver.next_Bk[0, 0] == 0  # the rejected one comes from max(0, p - q) = (0.4, 0.1, 0): u = 0 -> code 0
    assert ver.codes_accepted_B.tolist() == [3]
    # every draft accepted: the bonus unit is sampled from p at the last position (u = 0.95 -> code 2)
    ver = verify_drafts(p, q, torch.tensor([[[0, 0], [1, 0]]]), torch.zeros(1, 2, 2), torch.tensor([[0.95, 0.1]]),
                        ExactVerifier())
    assert ver.accepted_B.tolist() == [2] and ver.next_Bk.tolist() == [[2, 0]]


def test_measured_acceptance_matches_the_closed_form():
    """On a model whose conditionals ignore the prefix, per-token acceptance alpha = sum(min(p, q)) and the drafts
    accepted per round are alpha (1 - alpha^gamma) / (1 - alpha) (Leviathan et al.)."""
    target, drafter = TableModel(0, V=6, N=40, iid=True), TableModel(1, V=6, N=40, iid=True)
    p = target.tables[0][2, 0, 0].softmax(-1)
    q = drafter.tables[0][2, 0, 0].softmax(-1)
    alpha = float(torch.minimum(p, q).sum())
    gamma, B = 3, 400
    out = generate_speculative_exact(target, drafter, torch.full((B,), 1), torch.full((B,), 1), B, gamma=gamma,
                                     generators=[torch.Generator().manual_seed(i) for i in range(B)])
    per_round = float(out.stats.accepted.sum() / out.stats.rounds.sum())
    expected = alpha * (1 - alpha**gamma) / (1 - alpha)
    rounds = int(out.stats.rounds.sum())
    assert abs(per_round - expected) < 4 * (gamma / rounds) ** 0.5, (per_round, expected, rounds)
    assert out.stats.drafter_forwards.tolist() == (1 + gamma * out.stats.rounds).tolist()  # prefill + gamma
    assert out.stats.target_forwards.tolist() == (1 + out.stats.rounds).tolist()


# ---------------------------------------------------------------------------------------------- LANTERN


def ring_table(V: int) -> torch.Tensor:
    return torch.stack([torch.roll(torch.arange(V), -v) for v in range(V)])  # v, v + 1, v + 2, ...


def test_lantern_pools_the_longest_prefix_of_neighbours_within_delta():
    verifier = LanternVerifier(ring_table(6), k=3, delta=0.3)
    p = torch.tensor([[0.1, 0.2, 0.15, 0.05, 0.3, 0.2]])
    pooled, pool = verifier.pooled(p, torch.tensor([0]))
    assert torch.allclose(pooled, torch.tensor([0.3]))  # 0.1 + 0.2; adding 0.15 would exceed delta
    assert pool.tolist() == [[1, -1, -1]]
    residual = verifier.residual(p, torch.full((1, 6), 1 / 6), torch.tensor([0]))
    assert torch.allclose(residual, torch.tensor([[0, 0, 0, 0, 0.3 - 1 / 6, 0.2 - 1 / 6]]))  # x and its pool removed


def test_lantern_with_delta_zero_is_the_exact_rule_and_acceptance_grows_with_delta():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 2, 1, 10, generator=g).softmax(-1)
    q = torch.rand(4, 2, 1, 10, generator=g).softmax(-1)
    x = torch.randint(0, 10, (4, 2, 1), generator=g)
    exact = ExactVerifier()
    lantern0 = LanternVerifier(ring_table(10), k=5, delta=0.0)
    assert torch.equal(lantern0.accept_probability(p, q, x), exact.accept_probability(p, q, x))
    assert torch.equal(lantern0.residual(p[:, 0], q[:, 0], x[:, 0]), exact.residual(p[:, 0], q[:, 0], x[:, 0]))
    previous = exact.accept_probability(p, q, x)
    for delta in (0.1, 0.2, 0.4):
        now = LanternVerifier(ring_table(10), k=5, delta=delta).accept_probability(p, q, x)
        assert (now >= previous).all()
        previous = now
    assert (previous > exact.accept_probability(p, q, x)).any()


def test_neighbour_table_from_a_tokenizer_and_bad_knobs():
    from vgen.tokenizers.single_scale_vq import SingleScaleVQModel

    torch.manual_seed(0)
    vq = SingleScaleVQModel(vocab_size=32, codebook_dim=4, z_channels=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                            norm_num_groups=4)
    table = neighbour_table(vq.codebook_neighbours, 32, 5)
    assert table.shape == (32, 6) and torch.equal(table[:, 0], torch.arange(32))
    codebook = vq.quantize.codebook().float()
    dist = torch.cdist(codebook[3:4], codebook)[0]
    assert set(table[3, 1:].tolist()) == set(dist.argsort()[1:6].tolist())
    with pytest.raises(ValueError, match="delta must be in"):
        LanternVerifier(table, 3, 1.5)
    with pytest.raises(ValueError, match="k must be in 1..5"):
        LanternVerifier(table, 6, 0.1)
