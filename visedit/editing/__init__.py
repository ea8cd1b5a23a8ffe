"""Editors: the protocol (apply / restore / edit), the baselines FT-L, FT-V, IKE, MEND, and the registry."""

from .base import (EditRequest, Editor, editor_names, editor_settings, get_editor, load_preset, register_editor,
                   target_loss, trained_dir)
from .finetune import FineTuneLayer, FineTuneVision, FTLConfig, FTVConfig
from .ike import IKEConfig, InContextEditor
from .mend import MENDConfig, MENDEditor, train_mend
from .vead import VEAD, VEADConfig, VEADEditor, choose_edit_layer, train_vead

__all__ = ["EditRequest", "Editor", "FTLConfig", "FTVConfig", "FineTuneLayer", "FineTuneVision", "IKEConfig",
           "InContextEditor", "MENDConfig", "MENDEditor", "editor_names", "editor_settings", "get_editor",
           "load_preset", "register_editor", "target_loss", "train_mend", "trained_dir",
           "VEAD", "VEADConfig", "VEADEditor",
           "choose_edit_layer", "train_vead"]
