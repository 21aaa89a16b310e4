"""The app's library side: analysis of one image, feature drill-down, uploads, and the Gradio UI."""
