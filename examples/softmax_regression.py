"""The seeds' softmax-regression demo, trained with fused_softmax_ce's loss.

nn.Linear(3, 3) on one sample [2.0, 1.0, 0.1] with true class 0, SGD (lr 0.1),
100 epochs. Prints the loss every 10 epochs and the final probabilities.
"""
import torch
from torch import nn

from fused_softmax_ce import CrossEntropyLoss


class SoftmaxRegression(nn.Module):
    def __init__(self, num_features, num_classes):
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x):
        return self.linear(x)  # logits: the loss applies the softmax


def main():
    torch.manual_seed(1234)
    x = torch.tensor([[2.0, 1.0, 0.1]])
    y = torch.tensor([0])
    model = SoftmaxRegression(3, 3)
    criterion = CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(100):
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if epoch % 10 == 0:
            print(f"Epoch {epoch}, Loss: {loss.item():.4f}")
    probs = torch.softmax(model(x), dim=1)
    print("Final softmax probabilities:", probs.detach().numpy())
    print("Predicted class:", probs.argmax().item())


if __name__ == "__main__":
    main()
