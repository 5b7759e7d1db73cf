"""Thirteen nn.Modules as public PyTorch tutorials write them, for unitrain.from_torch.

Each class keeps its tutorial's code (layer names, functional calls, views); only sizes are
shrunk where a constructor argument allows it, so that tests stay quick. Sources:

* ``MnistNet``: pytorch/examples, mnist/main.py (``Net``).
* ``CifarNet``: "Training a Classifier" (CIFAR-10 tutorial, ``Net``).
* ``LeNet``: "Neural Networks" (60-minute blitz, ``Net``).
* ``DropoutMLP``: d2l.ai "Dropout", concise implementation (an ``nn.Sequential``).
* ``Autoencoder``: the fully connected MNIST autoencoder of the common tutorials (encoder and
  decoder ``nn.Sequential``s down to 3 features).
* ``UNet``: milesial/Pytorch-UNet's ``DoubleConv``, ``Down``, ``Up`` and ``OutConv`` (one level).
* ``GoogLeNetBlock``: d2l.ai "Networks with Parallel Concatenations" (``Inception``) with a head.
* ``DynamicNet``: "Learning PyTorch with Examples" (one ``middle_linear`` at several places; the
  tutorial draws how many per forward, a trace is one path: two here).
* ``TwoInputNet``: the image-plus-features model of the PyTorch forums' multi-input answer.
* ``LSTMTagger``: "Sequence Models and Long Short-Term Memory Networks".
* ``BiLSTMClassifier``: the sentiment tutorials' bidirectional LSTM on its last layer's final states, its
  initial states zeros built in ``forward`` as yunjey/pytorch-tutorial's BiRNN builds them.
* ``GRUEncoderDecoder``: "NLP From Scratch: Translation with a Sequence to Sequence Network" (the
  encoder's final state starts the decoder).
"""

# ruff: noqa: UP008 (super(Net, self), as the tutorials write it)

import torch
import torch.nn.functional as F
from torch import nn


class MnistNet(nn.Module):
    def __init__(self):
        super(MnistNet, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


class CifarNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)  # flatten all dimensions except batch
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


class LeNet(nn.Module):
    def __init__(self):
        super(LeNet, self).__init__()
        # 1 input image channel, 6 output channels, 5x5 square convolution kernel
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        # an affine operation: y = Wx + b
        self.fc1 = nn.Linear(16 * 5 * 5, 120)  # 5*5 from image dimension
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, input):
        c1 = F.relu(self.conv1(input))
        s2 = F.max_pool2d(c1, (2, 2))
        c3 = F.relu(self.conv2(s2))
        s4 = F.max_pool2d(c3, 2)
        s4 = torch.flatten(s4, 1)
        f5 = F.relu(self.fc1(s4))
        f6 = F.relu(self.fc2(f5))
        output = self.fc3(f6)
        return output


def DropoutMLP(num_inputs=64, num_hiddens1=32, num_hiddens2=32, num_outputs=10, dropout1=0.2, dropout2=0.5):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(num_inputs, num_hiddens1),
        nn.ReLU(),
        # Add a dropout layer after the first fully connected layer
        nn.Dropout(dropout1),
        nn.Linear(num_hiddens1, num_hiddens2),
        nn.ReLU(),
        # Add a dropout layer after the second fully connected layer
        nn.Dropout(dropout2),
        nn.Linear(num_hiddens2, num_outputs),
    )


class Autoencoder(nn.Module):
    def __init__(self, pixels=8 * 8):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(pixels, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
            nn.Linear(12, 3),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(),
            nn.Linear(32, pixels), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x):
        encoded = self.encoder(x)
        decoded = self.decoder(encoded)
        return decoded


class DoubleConv(nn.Module):
    """(convolution => [BN] => ReLU) * 2"""

    def __init__(self, in_channels, out_channels, mid_channels=None):
        super().__init__()
        if not mid_channels:
            mid_channels = out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """Downscaling with maxpool then double conv"""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upscaling then double conv"""

    def __init__(self, in_channels, out_channels, bilinear=True):
        super().__init__()
        # if bilinear, use the normal convolutions to reduce the number of channels
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        # input is CHW
        diffY = x2.size()[2] - x1.size()[2]
        diffX = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diffX // 2, diffX - diffX // 2, diffY // 2, diffY - diffY // 2])
        x = torch.cat([x2, x1], dim=1)
        return self.conv(x)


class OutConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super(OutConv, self).__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class UNet(nn.Module):
    """milesial's UNet with one level down and up (``bilinear=False``: the ConvTranspose2d way)."""

    def __init__(self, n_channels=1, n_classes=2, bilinear=False):
        super(UNet, self).__init__()
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, 4)
        self.down1 = Down(4, 8 // factor)
        self.up1 = Up(8, 4, bilinear)
        self.outc = OutConv(4, n_classes)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x = self.up1(x2, x1)
        logits = self.outc(x)
        return logits


class Inception(nn.Module):
    # c1--c4 are the number of output channels for each branch
    def __init__(self, in_channels, c1, c2, c3, c4, **kwargs):
        super(Inception, self).__init__(**kwargs)
        # Branch 1
        self.p1_1 = nn.Conv2d(in_channels, c1, kernel_size=1)
        # Branch 2
        self.p2_1 = nn.Conv2d(in_channels, c2[0], kernel_size=1)
        self.p2_2 = nn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        # Branch 3
        self.p3_1 = nn.Conv2d(in_channels, c3[0], kernel_size=1)
        self.p3_2 = nn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        # Branch 4
        self.p4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.p4_2 = nn.Conv2d(in_channels, c4, kernel_size=1)

    def forward(self, x):
        p1 = F.relu(self.p1_1(x))
        p2 = F.relu(self.p2_2(F.relu(self.p2_1(x))))
        p3 = F.relu(self.p3_2(F.relu(self.p3_1(x))))
        p4 = F.relu(self.p4_2(self.p4_1(x)))
        # Concatenate the outputs on the channel dimension
        return torch.cat((p1, p2, p3, p4), dim=1)


def GoogLeNetBlock():
    """An Inception block and d2l's GoogLeNet head (global average pool, flatten, a Linear)."""
    return nn.Sequential(Inception(4, 4, (4, 4), (2, 2), 2), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(12, 3))  # fmt: skip


class DynamicNet(torch.nn.Module):
    def __init__(self, D_in=8, H=8, D_out=3):
        super(DynamicNet, self).__init__()
        self.input_linear = torch.nn.Linear(D_in, H)
        self.middle_linear = torch.nn.Linear(H, H)
        self.output_linear = torch.nn.Linear(H, D_out)

    def forward(self, x):
        h_relu = self.input_linear(x).clamp(min=0)
        for _ in range(2):  # the tutorial: random.randint(0, 3) times
            h_relu = self.middle_linear(h_relu).clamp(min=0)
        y_pred = self.output_linear(h_relu)
        return y_pred


class TwoInputNet(nn.Module):
    def __init__(self):
        super(TwoInputNet, self).__init__()
        self.cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc1 = nn.Linear(4 + 5, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, image, data):
        x1 = self.cnn(image)
        x1 = x1.view(x1.size(0), -1)
        x2 = data
        x = torch.cat((x1, x2), dim=1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x


class LSTMTagger(nn.Module):
    def __init__(self, embedding_dim=6, hidden_dim=6, vocab_size=9, tagset_size=3):
        super(LSTMTagger, self).__init__()
        self.hidden_dim = hidden_dim

        self.word_embeddings = nn.Embedding(vocab_size, embedding_dim)

        # The LSTM takes word embeddings as inputs, and outputs hidden states
        # with dimensionality hidden_dim.
        self.lstm = nn.LSTM(embedding_dim, hidden_dim)

        # The linear layer that maps from hidden state space to tag space
        self.hidden2tag = nn.Linear(hidden_dim, tagset_size)

    def forward(self, sentence):
        embeds = self.word_embeddings(sentence)
        lstm_out, _ = self.lstm(embeds.view(len(sentence), 1, -1))
        tag_space = self.hidden2tag(lstm_out.view(len(sentence), -1))
        tag_scores = F.log_softmax(tag_space, dim=1)
        return tag_scores


class WordLanguageModel(nn.Module):
    """pytorch/examples' word_language_model RNNModel (LSTM, ``tie_weights=True``), its hidden state
    left to the LSTM's zeros and its batch of one sentence laid out as the tagger's above."""

    def __init__(self, ntoken=9, ninp=6, nhid=6, dropout=0.5):
        super(WordLanguageModel, self).__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid)
        self.decoder = nn.Linear(nhid, ntoken)
        # Optionally tie weights as in:
        # "Using the Output Embedding to Improve Language Models" (Press & Wolf 2016)
        self.decoder.weight = self.encoder.weight
        self.init_weights()

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input):
        emb = self.drop(self.encoder(input))
        output, _ = self.rnn(emb.view(len(input), 1, -1))
        output = self.drop(output)
        decoded = self.decoder(output.view(len(input), -1))
        return F.log_softmax(decoded, dim=1)


class BiLSTMClassifier(nn.Module):
    """The sentiment tutorials' bidirectional LSTM classifier (bentrevett/pytorch-sentiment-analysis:
    ``torch.cat((hidden[-2,:,:], hidden[-1,:,:]), dim=1)`` into the classifier), its states started as
    yunjey/pytorch-tutorial's BiRNN starts them: zeros built in ``forward`` (here in the input's dtype, so
    that the float64 reference runs too: ``x.new_zeros`` and ``torch.zeros(..., dtype=, device=)``)."""

    def __init__(self, vocab_size=9, embedding_dim=6, hidden_size=6, num_layers=2, num_classes=3):
        super(BiLSTMClassifier, self).__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(hidden_size * 2, num_classes)  # 2 for bidirection

    def forward(self, text):
        embedded = self.embedding(text)
        # Set initial states
        h0 = embedded.new_zeros(self.num_layers * 2, embedded.size(0), self.hidden_size)  # 2 for bidirection
        c0 = torch.zeros(self.num_layers * 2, embedded.size(0), self.hidden_size, dtype=embedded.dtype,
                         device=embedded.device)  # fmt: skip
        _, (hidden, _) = self.lstm(embedded, (h0, c0))
        hidden = torch.cat((hidden[-2, :, :], hidden[-1, :, :]), dim=1)
        return self.fc(hidden)


class GRUEncoderDecoder(nn.Module):
    """ "NLP From Scratch: Translation with a Sequence to Sequence Network"'s ``EncoderRNN`` and
    ``DecoderRNN`` (GRUs, the encoder's final hidden state the decoder's initial one), the decoder fed the
    whole target sequence at once (teacher forcing) and its last output classified (the tutorial's greedy
    loop over ``topk`` is not a trace)."""

    def __init__(self, input_size=9, output_size=9, hidden_size=6, num_classes=3):
        super(GRUEncoderDecoder, self).__init__()
        self.encoder_embedding = nn.Embedding(input_size, hidden_size)
        self.encoder_gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.decoder_embedding = nn.Embedding(output_size, hidden_size)
        self.decoder_gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.out = nn.Linear(hidden_size, num_classes)

    def forward(self, input, target):
        embedded = self.encoder_embedding(input)
        _, encoder_hidden = self.encoder_gru(embedded)
        output = F.relu(self.decoder_embedding(target))
        decoder_outputs, _ = self.decoder_gru(output, encoder_hidden)
        return self.out(decoder_outputs[:, -1])
