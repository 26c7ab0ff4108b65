"""The shared layer every model stands on."""
