"""Complex convolutions for the functional API, made of real convolutions of the real and imaginary parts.

A convolution is bilinear, so with x = xr + i·xi and w = wr + i·wi
    conv(x, w) = conv(xr, wr) − conv(xi, wi)  +  i·(conv(xr, wi) + conv(xi, wr)).
We compute the four real convolutions as written rather than Gauss's three (t1 = conv(xr, wr),
t2 = conv(xi, wi), t3 = conv(xr + xi, wr + wi); imaginary part t3 − t1 − t2), which torch uses. The fourth
convolution costs a third more, but Gauss's imaginary part is a difference of terms as large as
|xr·wr| + |xi·wi|, whatever the size of the result, so where the imaginary part is small beside the real
one it keeps only the digits left after the cancellation. Measured against a complex128 truth
(complex64, 8×16×32×32 input, 32 3×3 kernels, padding 1; largest error over the largest |value|, part by part):
    data                                  imaginary part: four products   Gauss    torch
    real and imaginary parts alike                         3.9e-7          7.1e-7   8.8e-7
    imaginary parts of x and w 1000× smaller               3.8e-7          4.5e-4   4.9e-4
    real parts of x and w 1000× smaller                    3.6e-7          5.3e-4   5.4e-4
(real parts 5e-7 in every row, every method). tests/test_complex.py checks the second row's gap.

The real convolutions are the functional layer's, which are differentiable, and torch.complex joins the
parts, so autograd composes the gradients: they follow torch's conjugate-Wirtinger convention
(torch.autograd.gradcheck passes on complex inputs, and gradients equal torch's), double backward included.
Call path: functional.py → here → functional.py's real convolution → autograd.py → _ops.py.
"""
import torch


def complex_conv(real_conv, input, weight, bias):
    """conv(input, weight) + bias for complex tensors of one dtype; real_conv(x, w, b) is the real convolution
    with the call's stride, padding, dilation and groups already bound. The bias's parts ride on one
    product each, so they cost no pass of their own."""
    xr, xi = input.real, input.imag
    wr, wi = weight.real, weight.imag
    br, bi = (None, None) if bias is None else (bias.real, bias.imag)
    real = real_conv(xr, wr, br) - real_conv(xi, wi)
    imag = real_conv(xr, wi, bi) + real_conv(xi, wr)
    return torch.complex(real, imag)
