"""ComfyUI nodes of the QVD pack (see qvd_nodes.py); ComfyUI itself is imported only when nodes run."""
from .qvd_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register_model_folder"]
