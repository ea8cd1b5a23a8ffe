"""VisEdit's editor: VEAD (visual edit adapter) with its influence mapper, the editor, and training."""

from .editor import EditMemory, VEADEditor, choose_edit_layer
from .module import VEAD, VEADConfig
from .train import train_vead

__all__ = ["EditMemory", "VEAD", "VEADConfig", "VEADEditor", "choose_edit_layer", "train_vead"]
