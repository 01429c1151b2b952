import Saga
