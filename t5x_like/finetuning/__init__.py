"""Parameter-efficient fine-tuning: adapters added to a frozen base model.

    lora          LoRA on any dense projection chosen by a regex over parameter paths
    prompt_tuning a soft prompt: learned vectors in front of every example's input
    trainable     which parameters a run trains, and the split into trainable and frozen

An adapter is attached to a model wrapper (`t5.EncoderDecoderModel.adapter`,
`decoder.DecoderOnlyModel.adapter`, the `models.trainable.Adapter` protocol), so the
model families need no code of their own for it.
"""
