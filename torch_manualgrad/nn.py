"""Drop-in modules: Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, MaxPool1d,
MaxPool2d, MaxPool3d, subclasses of their torch.nn namesakes.

They keep torch.nn's constructor, parameters, state_dict and repr (isinstance(m, torch.nn.Conv2d) is
still true); only the computation is replaced by torch_manualgrad.functional.
"""
import torch

from . import _exporting, functional

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "MaxPool1d",
           "MaxPool2d", "MaxPool3d"]


class _OurLayer:
    def __prepare_scriptable__(self):
        _exporting.refuse_script(self)


class _OurConv(_OurLayer):
    """Replaces torch.nn's _conv_forward; padding modes other than zeros pad first, as torch.nn does."""

    _functional = None

    def _conv_forward(self, input, weight, bias):
        padding = self.padding
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return type(self)._functional(input, weight, bias, self.stride, padding, self.dilation, self.groups)


class _OurConvTranspose(_OurLayer):
    """torch.nn's ConvTranspose forward, output_size included (torch.nn's own _output_padding turns it into
    output_padding), computed by our functional."""

    _functional = None

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError(f"Only `zeros` padding mode is supported for {type(self).__name__}")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              len(self.kernel_size), self.dilation)
        return type(self)._functional(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                      self.groups, self.dilation)


class _OurMaxPool(_OurLayer):
    _functional = None

    def forward(self, input):
        return type(self)._functional(
            input, self.kernel_size, self.stride, self.padding, self.dilation,
            ceil_mode=self.ceil_mode, return_indices=self.return_indices,
        )


class Conv1d(_OurConv, torch.nn.Conv1d):
    """torch.nn.Conv1d computed by our kernels."""

    _functional = staticmethod(functional.conv1d)


class Conv2d(_OurConv, torch.nn.Conv2d):
    """torch.nn.Conv2d computed by our kernels."""

    _functional = staticmethod(functional.conv2d)


class Conv3d(_OurConv, torch.nn.Conv3d):
    """torch.nn.Conv3d computed by our kernels."""

    _functional = staticmethod(functional.conv3d)


class ConvTranspose1d(_OurConvTranspose, torch.nn.ConvTranspose1d):
    """torch.nn.ConvTranspose1d computed by our kernels."""

    _functional = staticmethod(functional.conv_transpose1d)


class ConvTranspose2d(_OurConvTranspose, torch.nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d computed by our kernels."""

    _functional = staticmethod(functional.conv_transpose2d)


class ConvTranspose3d(_OurConvTranspose, torch.nn.ConvTranspose3d):
    """torch.nn.ConvTranspose3d computed by our kernels."""

    _functional = staticmethod(functional.conv_transpose3d)


class MaxPool1d(_OurMaxPool, torch.nn.MaxPool1d):
    """torch.nn.MaxPool1d computed by our kernels."""

    _functional = staticmethod(functional.max_pool1d)


class MaxPool2d(_OurMaxPool, torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d computed by our kernels."""

    _functional = staticmethod(functional.max_pool2d)


class MaxPool3d(_OurMaxPool, torch.nn.MaxPool3d):
    """torch.nn.MaxPool3d computed by our kernels."""

    _functional = staticmethod(functional.max_pool3d)
