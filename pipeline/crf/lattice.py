"""The permutohedral lattice (Adams, Baek & Davis 2010) in torch ops: Gaussian filtering in d dimensions.

The same arithmetic as the lattice inside pydensecrf (Krähenbühl & Koltun's ``permutohedral.cpp``), written
as whole-tensor operations so that one code path runs on CPU and CUDA with no compiled extension:

- elevate each feature vector onto the hyperplane of the (d+1)-dimensional lattice, round to the nearest
  remainder-0 point and find the enclosing simplex by sorting (its barycentric weights);
- hash the d+1 vertices of every simplex: their integer keys packed into one int64 code, then ``unique``;
- each lattice point's two neighbours along each of the d+1 axes: a fixed code offset, found by
  ``searchsorted``;
- filter: splat by ``index_add``, blur ([1/2, 1, 1/2] along each axis) by ``index_select``, slice as one
  sparse (points x lattice) matrix product.

Several images can share one lattice (``groups``): their points never meet, so one filter call serves a
batch of windows of any sizes.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["Permutohedral"]

_PACKABLE = 2**62  # a key space up to this size packs into one int64 code


class Permutohedral:
    """A lattice built once for ``features`` (N, d), then ``filter`` as often as mean field needs.

    ``groups`` (N,) int64: points of different groups never interact (one lattice for a batch of images).
    """

    def __init__(self, features: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        if features.ndim != 2 or features.shape[1] < 1 or features.shape[0] < 1:
            raise ValueError(f"features must be (points, dims), got shape {tuple(features.shape)}")
        points, dims = features.shape
        self.points = points
        self.dims = dims
        rem0, rank, weights = _simplices(features.float())
        group = (
            groups.to(device=features.device, dtype=torch.int64)
            if groups is not None
            else torch.zeros(points, dtype=torch.int64, device=features.device)
        )
        keys = _Keys.of(rem0, group, dims)
        self.packed = keys.radix is not None  # else keys too wide for one int64: the table
        codes = keys.vertex_codes(rem0, rank, group)  # (N, d+1)
        lattice_codes, vertex = torch.unique(codes, sorted=True, return_inverse=True)
        self.vertices = int(lattice_codes.numel())
        # points x (lattice + 1): the last column, never used by a point, stands for an absent neighbour
        order = vertex.argsort(1)  # sorted columns in each row, as sparse kernels on every device expect
        with warnings.catch_warnings():  # torch calls sparse CSR beta; construction and matmul are stable
            warnings.simplefilter("ignore", UserWarning)
            self.slice_matrix = torch.sparse_csr_tensor(
                torch.arange(0, points * (dims + 1) + 1, dims + 1, device=features.device),
                vertex.gather(1, order).reshape(-1),
                weights.gather(1, order).reshape(-1),
                (points, self.vertices + 1),
                check_invariants=False,
            )
        self.splat_index = vertex.reshape(-1)
        self.splat_weights = weights.reshape(1, -1)
        self.neighbours = keys.neighbours(lattice_codes)  # (d+1, 2, M), M where absent
        # pydensecrf's correction for the blur's overall gain (Adams et al.'s "alpha")
        self.alpha = 1.0 / (1.0 + 2.0 ** (-dims))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Gaussian-filter ``values`` (N, channels) over the feature space: splat, blur, slice."""
        # (channels, lattice + 1): each channel contiguous, so that the blur's gathers read runs of memory
        channels = values.shape[1]
        lattice = values.new_zeros((channels, self.vertices + 1))
        spread = values.t().repeat_interleave(self.dims + 1, dim=1).mul_(self.splat_weights)
        lattice.index_add_(1, self.splat_index, spread)
        blurred = torch.empty_like(lattice)
        blurred[:, -1] = 0
        inner = slice(0, self.vertices)
        for lower, upper in self.neighbours:
            torch.add(lattice.index_select(1, lower), lattice.index_select(1, upper), out=blurred[:, inner])
            blurred[:, inner].mul_(0.5).add_(lattice[:, inner])
            lattice, blurred = blurred, lattice
        return (self.slice_matrix @ lattice.t()).mul_(self.alpha)


def _simplices(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each point's enclosing simplex, as pydensecrf computes it: the remainder-0 point it rounds to
    (N, d+1) int64, each coordinate's rank (N, d+1) and the d+1 barycentric weights (N, d+1)."""
    points, dims = features.shape
    device = features.device
    # the diagonal of E (Adams et al. p.5), scaled for the filter's expected standard deviation (p.6)
    inv_std_dev = math.sqrt(2.0 / 3.0) * (dims + 1)
    index = torch.arange(dims, device=device, dtype=torch.float64)
    scale = (inv_std_dev / torch.sqrt((index + 2) * (index + 1))).float()
    scaled = features * scale
    # elevated[0] = sum of all; elevated[j] = (sum of scaled[j:]) - j * scaled[j-1]
    suffix = scaled.flip(1).cumsum(1).flip(1)
    tail = torch.cat([suffix[:, 1:], suffix.new_zeros(points, 1)], dim=1)
    steps = torch.arange(1, dims + 1, device=device, dtype=torch.float32)
    elevated = torch.cat([suffix[:, :1], tail - steps * scaled], dim=1)  # (N, d+1)
    # nearest remainder-0 lattice point: each coordinate to a multiple of d+1 (ties go down, as in C)
    down_factor = torch.tensor(1.0 / (dims + 1), dtype=torch.float32, device=device)
    v = elevated * down_factor
    up = torch.ceil(v) * (dims + 1)
    down = torch.floor(v) * (dims + 1)
    rem0_float = torch.where(up - elevated < elevated - down, up, down)
    rem0 = rem0_float.to(torch.int64)
    coordinate_sum = torch.div(rem0.sum(1), dims + 1, rounding_mode="floor")
    # rank: each coordinate's place in the descending order of the residual (ties: lower index first)
    order = torch.sort(rem0_float - elevated, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(dims + 1, device=device).expand(points, -1).contiguous())
    # bring points whose rounded coordinates do not sum to zero back onto the plane
    rank += coordinate_sum.unsqueeze(1)
    wrap = (rank < 0).long() - (rank > dims).long()
    rank += (dims + 1) * wrap
    rem0 += (dims + 1) * wrap
    # barycentric coordinates (p.10)
    delta = (elevated - rem0.float()) * down_factor
    barycentric = features.new_zeros(points, dims + 2)
    barycentric.scatter_add_(1, dims - rank, delta)
    barycentric.scatter_add_(1, dims - rank + 1, -delta)
    barycentric[:, 0] += 1.0 + barycentric[:, dims + 1]
    return rem0, rank, barycentric[:, : dims + 1].contiguous()


class _Keys:
    """Lattice keys (the first d coordinates of a point, then its group) <-> int64 codes.

    Packed: mixed radix over the range the keys can take, with room for a neighbour's step, so that a
    vertex's code and a neighbour's offset are sums of radices and no key is ever materialised. Where that
    range exceeds int64 (many dimensions, fine kernels): a table of every key met, searched by ``unique``.
    """

    def __init__(self, dims: int, low: torch.Tensor, radix: torch.Tensor | None) -> None:
        self.dims = dims
        self.low = low
        self.radix = radix
        self.table: torch.Tensor | None = None

    @classmethod
    def of(cls, rem0: torch.Tensor, group: torch.Tensor, dims: int) -> _Keys:
        # a vertex differs from its remainder-0 point by at most d+1 per coordinate, a neighbour by d more
        reach = 2 * dims + 1
        low = torch.cat([rem0[:, :dims].amin(0) - reach, group.amin().view(1)])
        high = torch.cat([rem0[:, :dims].amax(0) + reach, group.amax().view(1)])
        spans = (high - low + 1).tolist()
        if math.prod(spans) >= _PACKABLE:
            return cls(dims, low, None)
        strides = [math.prod(spans[i + 1 :]) for i in range(len(spans))]
        return cls(dims, low, torch.tensor(strides, dtype=torch.int64, device=rem0.device))

    def vertex_codes(self, rem0: torch.Tensor, rank: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """(N, d+1): the code of each simplex vertex; vertex r adds r to the coordinates ranked within
        d - r and r - (d+1) to the others."""
        dims = self.dims
        remainder = torch.arange(dims + 1, device=rem0.device)
        if self.radix is None:
            beyond = rank[:, :dims].unsqueeze(1) > (dims - remainder).view(1, -1, 1)
            keys = rem0[:, :dims].unsqueeze(1) + remainder.view(1, -1, 1) - (dims + 1) * beyond.long()
            with_group = torch.cat([keys, group.view(-1, 1, 1).expand(-1, dims + 1, 1)], dim=2)
            flat = with_group.reshape(-1, dims + 1)
            self.table = torch.unique(flat, dim=0)
            return self._lookup(flat).view(-1, dims + 1)
        radix = self.radix[:dims]
        base = ((rem0[:, :dims] - self.low[:dims]) * radix).sum(1) + (group - self.low[dims]) * self.radix[
            dims
        ]
        # radix_by_rank[k]: the radix of the coordinate ranked k (the implied last coordinate has none)
        radix_by_rank = torch.zeros_like(rank)
        radix_by_rank.scatter_(1, rank[:, :dims], radix.expand(rank.shape[0], -1).contiguous())
        # ranked_from[k]: the radices of the coordinates ranked k or later (k = 1 .. d+1)
        ranked_from = torch.cat(
            [radix_by_rank.flip(1).cumsum(1).flip(1)[:, 1:], radix_by_rank.new_zeros(rank.shape[0], 1)], 1
        )
        total = int(radix.sum())
        # vertex r: base + r * (sum of radices) - (d+1) * (radices of the coordinates ranked d-r+1 or later)
        return base.unsqueeze(1) + remainder * total - (dims + 1) * ranked_from.flip(1)

    def neighbours(self, lattice_codes: torch.Tensor) -> torch.Tensor:
        """(d+1, 2, M): each lattice point's neighbour one step down and one up along each axis; M when
        absent. Along axis j < d the step is -1 on every coordinate but +d on j; along axis d, -1 on all."""
        dims = self.dims
        vertices = lattice_codes.numel()
        steps = torch.full((dims + 1, dims + 1), -1, dtype=torch.int64, device=lattice_codes.device)
        steps[torch.arange(dims), torch.arange(dims)] = dims
        steps[:, dims] = 0  # the group column never changes
        every = torch.arange(vertices, device=lattice_codes.device)
        found = torch.full((dims + 1, 2, vertices), vertices, dtype=torch.int64, device=lattice_codes.device)
        for axis in range(dims + 1):
            codes = self._shifted(lattice_codes, steps[axis])
            place = torch.searchsorted(lattice_codes, codes).clamp(max=vertices - 1)
            hit = lattice_codes[place] == codes
            found[axis, 0] = torch.where(hit, place, vertices)
            # the relation is symmetric: p's lower neighbour q has p as its upper one (half the searches)
            found[axis, 1, place[hit]] = every[hit]
        return found

    def _shifted(self, codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        if self.radix is not None:
            return codes + int((step * self.radix).sum())
        assert self.table is not None
        return self._lookup(self.table[codes] + step)

    def _lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Each row's place in the table, or -1 where the table lacks it."""
        assert self.table is not None
        known = self.table.shape[0]
        _, inverse = torch.unique(torch.cat([self.table, keys]), dim=0, return_inverse=True)
        place = torch.full((known + keys.shape[0],), -1, dtype=torch.int64, device=keys.device)
        place[inverse[:known]] = torch.arange(known, device=keys.device)
        return place[inverse[known:]]
