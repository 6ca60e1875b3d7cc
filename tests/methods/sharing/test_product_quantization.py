"""Product quantization (methods/sharing/product.py): sub-vector k-means, exact reconstruction, centroid
gradients, the packed file's product_codebook encoding and its refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.methods.pruning import add_mask
from lightning_compress.methods.sharing import kmeans_vectors, product as P
from lightning_compress.methods.sharing.packed import load_compressed, save_compressed

from .packed_files import Packed


def _blocks(layer: nn.Module, d: int) -> torch.Tensor:
    """(rows, blocks, d): the layer's sub-vectors, cut by hand."""
    return _blocks_of(layer.weight.detach(), d)


def test_kmeans_vectors_labels_are_nearest_and_centroids_are_means():
    torch.manual_seed(0)
    points = torch.randn(3, 200, 4)
    centroids, labels = kmeans_vectors(points, 8, iters=100)
    assert centroids.shape == (3, 8, 4) and labels.shape == (3, 200)
    distances = (points[:, :, None] - centroids[:, None]).square().sum(-1)
    assert (distances.argmin(-1) == labels).float().mean() > 0.99  # converged (Lloyd's fixed point)
    for block in range(3):
        for j in labels[block].unique():
            members = points[block][labels[block] == j]
            assert torch.allclose(centroids[block, j], members.mean(0), atol=1e-6)
    few, few_labels = kmeans_vectors(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), 4)  # fewer points than k
    assert torch.equal(few[0][few_labels[0]], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="k=0"):
        kmeans_vectors(points, 0)


@pytest.mark.parametrize("layer, d", [(nn.Linear(24, 40), 4), (nn.Conv2d(3, 16, 3), 9), (nn.Conv2d(4, 8, 3), 6)])
def test_each_subvector_is_its_centroid(layer, d):
    torch.manual_seed(0)
    P.share_product(layer, bits=2, subvector_size=d)
    code, codebook = layer.weight_pq_code, layer.weight_pq_codebook
    rows, length = layer.weight.shape[0], layer.weight[0].numel()
    assert code.shape == (rows, length // d) and codebook.shape == (length // d, 4, d)
    assert code.dtype == torch.int32 and int(code.min()) >= 0 and int(code.max()) < 4
    vectors = _blocks(layer, d)
    for block in range(length // d):
        assert torch.equal(vectors[:, block], codebook[block][code[:, block].long()])
        assert vectors[:, block].unique(dim=0).shape[0] <= 4
    assert torch.equal(layer.weight, P.reconstruct(layer))


def test_more_centroids_reconstruct_better():
    torch.manual_seed(0)
    original = nn.Linear(32, 128)
    errors = []
    for bits in (1, 3, 5):
        layer = nn.Linear(32, 128)
        layer.load_state_dict(original.state_dict())
        P.share_product(layer, bits=bits, subvector_size=4)
        errors.append(float((layer.weight - original.weight).detach().square().mean()))
    assert errors[0] > errors[1] > errors[2] > 0


def test_a_codebook_as_large_as_the_distinct_subvectors_reproduces_the_layer_exactly():
    torch.manual_seed(0)
    layer = nn.Linear(12, 64)
    with torch.no_grad():  # each block's 64 sub-vectors drawn from 5 distinct ones
        palette = torch.randn(3, 5, 4)
        choice = torch.randint(5, (64, 3))
        layer.weight.copy_(palette[torch.arange(3)[None, :], choice].reshape(64, 12))
    before = layer.weight.detach().clone()
    P.share_product(layer, bits=3, subvector_size=4)  # 8 centroids >= 5 distinct sub-vectors
    assert torch.equal(layer.weight, before)
    # K is capped at the rows: with 2**bits >= rows every row is its own centroid, whatever the weights.
    dense = nn.Linear(8, 10)
    before = dense.weight.detach().clone()
    P.share_product(dense, bits=6, subvector_size=2)
    assert dense.weight_pq_codebook.shape == (4, 10, 2) and torch.equal(dense.weight, before)


def test_centroid_gradient_is_the_sum_of_its_subvectors_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(16, 48)
    P.share_product(layer, bits=2, subvector_size=4)
    layer(torch.randn(8, 16)).square().sum().backward()
    raw = _blocks_of(layer.weight.grad.clone(), 4)
    P.tie_gradients(layer)
    tied = _blocks_of(layer.weight.grad, 4)
    code = layer.weight_pq_code.long()
    for block in range(4):
        for j in range(4):
            members = code[:, block] == j
            if members.any():
                expected = raw[members, block].sum(0)
                assert torch.allclose(tied[members, block], expected.expand(int(members.sum()), 4), atol=1e-6)

    layer.weight.grad = _unblocks(raw, layer.weight.shape)
    P.tie_gradients(layer, "mean")
    tied = _blocks_of(layer.weight.grad, 4)
    members = code[:, 0] == code[0, 0]
    assert torch.allclose(tied[0, 0], raw[members, 0].mean(0), atol=1e-6)


def test_finetuning_moves_centroids_and_keeps_members_equal_under_sgd_momentum():
    torch.manual_seed(0)
    layer = nn.Linear(16, 32)
    P.share_product(layer, bits=2, subvector_size=4)
    before = layer.weight_pq_codebook.clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for _ in range(4):
        optimizer.zero_grad()
        layer(torch.randn(8, 16)).square().sum().backward()
        P.tie_gradients(layer, "mean")
        optimizer.step()
        vectors, code = _blocks(layer, 4), layer.weight_pq_code.long()
        for j in code[:, 0].unique():
            assert vectors[code[:, 0] == j, 0].unique(dim=0).shape[0] == 1  # members moved together
        P.sync_to_codebook(layer)
        assert torch.equal(layer.weight, P.reconstruct(layer))
    assert not torch.equal(before, layer.weight_pq_codebook)


def test_refusals_name_the_argument_and_the_valid_choices():
    with pytest.raises(ValueError, match=r"rows hold 9 weights.*subvector_size=4.*valid: 1, 3, 9"):
        P.share_product(nn.Conv2d(1, 4, 3), bits=2, subvector_size=4)
    with pytest.raises(ValueError, match="subvector_size=0 must be an integer >= 1"):
        P.add_product_buffers(nn.Linear(8, 4), bits=2, subvector_size=0)
    with pytest.raises(ValueError, match="pruning mask.*method='kmeans'"):
        P.share_product(add_mask(nn.Linear(8, 4)), bits=2, subvector_size=4)


def _pq_layer() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 256), nn.ReLU(), nn.Linear(256, 10))
    P.share_product(model[0], bits=3, subvector_size=4)
    return model


def test_packed_file_stores_codes_and_codebooks_and_loads_bit_exactly(tmp_path):
    model = _pq_layer()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with_buffers = save_compressed(model, tmp_path / "buffers.lcpk")  # found from the layer's buffers
    assert with_buffers.layers[0].encoding == "product_codebook"
    state = load_compressed(tmp_path / "buffers.lcpk")
    assert all(torch.equal(state[k], v) for k, v in trained.items())

    P.remove_product_buffers(model[0])  # as at fit end: the weight alone, its sub-vector length given
    summary = save_compressed(model, tmp_path / "pq.lcpk", subvectors={"0.weight": 4})
    layer = summary.layers[0]
    assert layer.encoding == "product_codebook" and layer.distinct == 8
    assert set(layer.part_bytes) == {"codes", "codebook"} and layer.part_bytes["codebook"] == 12 * 8 * 4 * 4
    assert layer.code_bits < 3.05  # Huffman-coded, at most about log2(8) bits a code
    scalar = save_compressed(model, tmp_path / "scalar.lcpk")  # without the hint: a scalar codebook
    assert scalar.layers[0].encoding != "product_codebook"
    assert layer.stored_bytes < scalar.layers[0].stored_bytes
    fresh = nn.Sequential(nn.Linear(48, 256), nn.ReLU(), nn.Linear(256, 10))
    load_compressed(tmp_path / "pq.lcpk", model=fresh)
    assert all(torch.equal(fresh.state_dict()[k], model.state_dict()[k]) for k in fresh.state_dict())
    with pytest.raises(ValueError, match=r"subvectors\['0.weight'\]=5 does not divide the 48.*valid: 1, 2, 3, 4, 6"):
        save_compressed(model, tmp_path / "bad.lcpk", subvectors={"0.weight": 5})
    with pytest.raises(ValueError, match="'0.bias', which is not a Conv / Linear weight"):
        save_compressed(model, tmp_path / "bad.lcpk", subvectors={"0.bias": 4})


@pytest.fixture(scope="module")
def pq_file(tmp_path_factory) -> bytes:
    model = _pq_layer()
    P.remove_product_buffers(model[0])
    path = tmp_path_factory.mktemp("pq") / "pq.lcpk"
    save_compressed(model, path, subvectors={"0.weight": 4})
    return path.read_bytes()


def _with_codebook_size(size_change: int):
    def edit(entry: dict, packed: Packed) -> None:  # codebook bytes made to agree: only the codes disagree
        entry["codebook_size"] += size_change
        entry["parts"]["codebook"][1] += size_change * 48 * 4
    return edit


@pytest.mark.parametrize(
    "edit, field, message",
    [
        (lambda e, p: e.update(subvector_size=5), "subvector_size", "divides the 48 entries"),
        (lambda e, p: e.update(subvector_size="4"), "subvector_size", "is not an integer"),
        (lambda e, p: e.update(subvector_size=2), "parts.codes", "imply 6,144 \\(one code per sub-vector\\)"),
        (lambda e, p: e.update(codebook_size=9), "parts.codebook", "need 1,728"),
        (lambda e, p: e.update(codebook_size=1 << 20), "codebook_size", "not an integer in \\[1, 65536\\]"),
        (lambda e, p: e.update(codebook_size=0), "codebook_size", "not an integer in \\[1, 65536\\]"),
        (lambda e, p: e.update(shape=[256 * 48]), "shape", "at least 2 dimensions"),
        (lambda e, p: e.update(shape=[128, 96]), "parts.codebook", "24 sub-spaces"),
        (_with_codebook_size(-1), "parts.codes", "alphabet of 8 symbols; codebook_size=7 allows 7"),
        (lambda e, p: e["parts"].pop("codebook"), "parts", "a product_codebook tensor has the parts"),
        (lambda e, p: e.pop("kind"), "kind", "missing"),
    ],
)
def test_malformed_product_entries_are_refused_by_field(tmp_path, pq_file, edit, field, message):
    packed = Packed.parse(pq_file)
    entry = packed.entry("0.weight")
    assert entry["encoding"] == "product_codebook"
    edit(entry, packed)
    path = tmp_path / "hostile.lcpk"
    path.write_bytes(packed.to_bytes())
    with pytest.raises(ValueError, match=f"{path}.*'0.weight', field '{field}'.*{message}"):
        load_compressed(path)


def _blocks_of(tensor: torch.Tensor, d: int) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1, d)


def _unblocks(tensor: torch.Tensor, shape) -> torch.Tensor:
    return tensor.reshape(shape).clone()
