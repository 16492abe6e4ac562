"""The export stage's re-parameterization step: export the deploy form by default.

A model with blocks that know how to fold their training-time structure (RepVGG and
QARepVGG branches into one 3x3 conv, sparse shift displacements into a static plan of
data movement; see ``models.reparam``) is exported in that folded form unless asked
otherwise: it is what a device should run (fewer ops, one conv per RepVGG block), and it
is exactly equivalent in eval mode. The reference ``pt`` artifact then holds the deploy
weights and says ``reparameterized`` in its metadata, which ``models.checkpoint.build_model``
honours, so ``verify`` compares against the same form. The manifest's ``source`` records
what was done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from models.errors import InputError
from models.reparam import reparameterizable_modules, reparameterize_model


@dataclass
class DeployForm:
    model: nn.Module
    meta: dict[str, Any]
    reparameterized: bool
    modules: list[str] = field(default_factory=list)      # the modules that fold (or would)
    warnings: list[str] = field(default_factory=list)

    def source(self) -> dict[str, Any]:
        """What the manifest's ``source`` records."""
        return {"reparameterized": self.reparameterized, "reparameterizable_modules": len(self.modules)}


def deploy_form(model: nn.Module, meta: dict[str, Any], *, reparameterize: bool = True,
                spec: str = "model") -> DeployForm:
    """Fold ``model`` in place when it has re-parameterizable blocks and ``reparameterize``;
    with ``reparameterize=False`` keep the training form and say why that is unusual."""
    names = reparameterizable_modules(model)
    if not names:
        return DeployForm(model, meta, False)
    if reparameterize:
        model = reparameterize_model(model, inplace=True)
        return DeployForm(model, {**meta, "reparameterized": True}, True, names)
    frozen_only = [n for n in names if getattr(model.get_submodule(n), "export_needs_deploy", False)]
    if frozen_only:
        raise InputError("--no-reparam", "a model whose training form can be exported",
                         f"{spec}: {len(frozen_only)} sparse shift layers ({frozen_only[0]}, ...) export "
                         "only in their deploy form (their displacements become integers when frozen)")
    return DeployForm(model, meta, False, names, [
        f"--no-reparam: exporting the training form of {len(names)} re-parameterizable blocks "
        f"({names[0]}, ...): every branch stays a separate op, so the graph is larger and slower "
        "than the deploy form, which computes the same outputs"])
