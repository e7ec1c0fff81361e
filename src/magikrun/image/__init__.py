"""Images: the image model, and bundles built from images for the runtimes."""

import typing

from .. import _lazy

if typing.TYPE_CHECKING:
    from ._auth import Credentials as Credentials
    from ._auth import load_credentials as load_credentials
    from ._bundle import Bundle as Bundle
    from ._bundle import BundleBuilder as BundleBuilder
    from ._bundle import ContainerConfig as ContainerConfig
    from ._bundle import Mount as Mount
    from ._bundle import Resources as Resources
    from ._bundle import open_wasm_module as open_wasm_module
    from ._demo import BUSYBOX_DEMO_REF as BUSYBOX_DEMO_REF
    from ._demo import HELLO_WASM_DEMO_REF as HELLO_WASM_DEMO_REF
    from ._demo import build_demo_images as build_demo_images
    from ._demo import write_demo_layout as write_demo_layout
    from ._extract import ExtractBudget as ExtractBudget
    from ._extract import LayerStats as LayerStats
    from ._extract import apply_layer as apply_layer
    from ._extract import unpack_layer as unpack_layer
    from ._extract import unpack_layers as unpack_layers
    from ._layout import LayerEntry as LayerEntry
    from ._layout import LayoutWriter as LayoutWriter
    from ._layout import build_layer as build_layer
    from ._model import Descriptor as Descriptor
    from ._model import Image as Image
    from ._model import ImageConfig as ImageConfig
    from ._model import Layer as Layer
    from ._model import PlatformSpec as PlatformSpec
    from ._model import ProgressCallback as ProgressCallback
    from ._model import ProgressEvent as ProgressEvent
    from ._pull import pull as pull
    from ._reference import Reference as Reference
    from ._registry import FetchedManifest as FetchedManifest
    from ._registry import RegistryClient as RegistryClient
    from ._service import GcResult as GcResult
    from ._service import ImageService as ImageService
    from ._service import ImageSummary as ImageSummary
    from ._service import PullPolicy as PullPolicy
    from ._service import VerifyResult as VerifyResult

__all__ = [
    "BUSYBOX_DEMO_REF",
    "HELLO_WASM_DEMO_REF",
    "Bundle",
    "BundleBuilder",
    "ContainerConfig",
    "Credentials",
    "Descriptor",
    "ExtractBudget",
    "FetchedManifest",
    "GcResult",
    "Image",
    "ImageConfig",
    "ImageService",
    "ImageSummary",
    "Layer",
    "LayerEntry",
    "LayerStats",
    "LayoutWriter",
    "Mount",
    "PlatformSpec",
    "ProgressCallback",
    "ProgressEvent",
    "PullPolicy",
    "Reference",
    "RegistryClient",
    "Resources",
    "VerifyResult",
    "apply_layer",
    "build_demo_images",
    "build_layer",
    "load_credentials",
    "open_wasm_module",
    "pull",
    "unpack_layer",
    "unpack_layers",
    "write_demo_layout",
]

__getattr__, __dir__ = _lazy.attach(
    __name__,
    {
        "._auth": (
            "Credentials",
            "load_credentials",
        ),
        "._bundle": (
            "Bundle",
            "BundleBuilder",
            "ContainerConfig",
            "Mount",
            "Resources",
            "open_wasm_module",
        ),
        "._demo": (
            "BUSYBOX_DEMO_REF",
            "HELLO_WASM_DEMO_REF",
            "build_demo_images",
            "write_demo_layout",
        ),
        "._extract": (
            "ExtractBudget",
            "LayerStats",
            "apply_layer",
            "unpack_layer",
            "unpack_layers",
        ),
        "._layout": (
            "LayerEntry",
            "LayoutWriter",
            "build_layer",
        ),
        "._model": (
            "Descriptor",
            "Image",
            "ImageConfig",
            "Layer",
            "PlatformSpec",
            "ProgressCallback",
            "ProgressEvent",
        ),
        "._pull": ("pull",),
        "._reference": ("Reference",),
        "._registry": (
            "FetchedManifest",
            "RegistryClient",
        ),
        "._service": (
            "GcResult",
            "ImageService",
            "ImageSummary",
            "PullPolicy",
            "VerifyResult",
        ),
    },
)
