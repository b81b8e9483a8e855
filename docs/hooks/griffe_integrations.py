"""Griffe extension for the API page: document ``integrations/`` under the name users import it by.

The package ships the top-level ``integrations/`` folder as ``rewardplug.integrations`` (pyproject's
package-dir), which griffe cannot see from the file tree; this attaches it there, so the API page names
``rewardplug.integrations.trl.RewardFunction``, an importable path.
"""

from __future__ import annotations

import griffe


class AttachIntegrations(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name == "rewardplug" and "integrations" not in pkg.members:
            pkg.set_member("integrations", loader.load("integrations"))
