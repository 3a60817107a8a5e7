"""The Triton kernel of ``lit_xf.loss.linear_cross_entropy`` (imported only where Triton is)."""

import triton
import triton.language as tl


@triton.jit
def nll_and_grad_kernel(z_ptr, label_ptr, nll_ptr, hit_ptr, row_stride, V, ignore_index, BLOCK: tl.constexpr):
    """One program per row of z [N, V]: pass 1 streams the row for m = max z and
    lse = m + log Σ exp(z − m) (online, fp32); pass 2 overwrites it with exp(z − lse) − [j = label],
    or zeros where the label is ignored. The second read mostly hits L2 (a row is V·2 bytes). A
    label outside [0, V) reads no memory: its nll is NaN, which shows in the loss."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * row_stride
    label = tl.load(label_ptr + row)
    real = label != ignore_index
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        z = tl.load(z_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    in_range = (label >= 0) & (label < V)
    z_label = tl.load(z_row + tl.where(in_range, label, 0), mask=in_range, other=float("nan")).to(tl.float32)
    tl.store(nll_ptr + row, tl.where(real, lse - z_label, 0.0))
    tl.store(hit_ptr + row, real & (z_label >= m))
    for start in range(0, V, BLOCK):
        j = start + cols
        z = tl.load(z_row + j, mask=j < V, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(j == label, 1.0, 0.0)
        grad = tl.where(real, grad, 0.0)
        tl.store(z_row + j, grad.to(z_ptr.dtype.element_ty), mask=j < V)
