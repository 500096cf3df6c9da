"""Test stand-in for HailoRT 4.23's `hailo_platform` (see pyhailort/pyhailort.py).

Exports the subset of the real top level that dinowatch may use; every other exception class
lives only in `hailo_platform.pyhailort.pyhailort`, as in the real package.
"""

from hailo_platform.pyhailort.pyhailort import (
    HEF,
    AsyncInferJob,
    ConfigureParams,
    Device,
    FormatType,
    HailoCommunicationClosedException,
    HailoRTException,
    HailoRTStreamAbortedByUser,
    HailoSchedulingAlgorithm,
    HailoStreamInterface,
    VDevice,
)

__version__ = "4.23.0"

__all__ = ["HEF", "AsyncInferJob", "ConfigureParams", "Device", "FormatType",
           "HailoCommunicationClosedException", "HailoRTException", "HailoRTStreamAbortedByUser",
           "HailoSchedulingAlgorithm", "HailoStreamInterface", "VDevice"]
