# Bundled preset cards: one JSON file per official Keras Gemma preset, read by gemma_keras.presets.
