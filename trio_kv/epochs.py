"""View epochs: Lamport clocks over view installs (pure).

A view is installed at an epoch above every epoch its node has heard of, and replicas of one
view converge on the highest epoch any of them gave it.  So a peer on another view with a higher
epoch installed it after hearing of ours, or concurrently: either way ours is not the newer one,
and a pull made for a view with a lower epoch than ours comes from a straggler.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NewerView:
    """A peer serves a different view with a higher epoch: ours is probably stale."""

    epoch: int
    view_id: str
    peer: int


@dataclass
class Epochs:
    epoch: int = 0  # of our view
    target: int = 0  # of the view we are changing to
    seen: int = 0  # the highest epoch peers showed for other views
    newer_view: NewerView | None = None

    def observe(self, peer: int, epoch: int, view_id: str, ours: str | None,
                target: str | None) -> None:
        """Note a peer's epoch for ``view_id`` (``ours``: our view's id; ``target``: the id of
        the view we are changing to)."""
        if view_id == ours:
            self.epoch = max(self.epoch, epoch)
        elif view_id == target:
            self.target = max(self.target, epoch)
        else:
            self.seen = max(self.seen, epoch)
            if epoch > self.epoch and (self.newer_view is None or epoch > self.newer_view.epoch):
                self.newer_view = NewerView(epoch, view_id, peer)

    def change(self) -> int:
        """The epoch of the view we are changing to: above everything heard of so far."""
        self.target = max(self.target, self.epoch + 1, self.seen + 1)
        return self.target

    def installed(self, view_id: str) -> None:
        self.epoch = self.change()
        if self.newer_view is not None and (
            self.newer_view.view_id == view_id or self.newer_view.epoch < self.epoch
        ):
            self.newer_view = None
